"""Settings: flags, environment, a TOML file and an environment file, checked once."""
