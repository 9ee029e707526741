"""A stand-in for the Cekura API: a real HTTP server for tests, the demo, the benchmark and
``poller simulate`` (endpoints, faults and the seed file: docs/simulator.md)."""

from poller.devtools.simulator.generate import SimulatorError
from poller.devtools.simulator.handlers import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from poller.devtools.simulator.model import (
    DEFAULT_TOKEN,
    Fault,
    SimulatedApi,
    UnknownOrganizationError,
)
from poller.devtools.simulator.records import FieldValidationError
from poller.devtools.simulator.server import SimulatorServer, run_simulator, write_keys_file
from poller.devtools.simulator.usage import MAX_SCALE, Crossing

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_TOKEN",
    "MAX_PAGE_SIZE",
    "MAX_SCALE",
    "Crossing",
    "Fault",
    "FieldValidationError",
    "SimulatedApi",
    "SimulatorError",
    "SimulatorServer",
    "UnknownOrganizationError",
    "run_simulator",
    "write_keys_file",
]
