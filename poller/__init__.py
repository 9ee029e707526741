"""poller: low-credits alerts for Cekura organizations."""

__version__ = "0.1.0"
