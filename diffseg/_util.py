"""Small helpers shared across the package."""
import os


def env_flag(name):
    """True when the environment variable ``name`` is 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
