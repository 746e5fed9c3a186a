"""The Prefect flows, the CLI and the server command: our entry points, so the known third-party noise is
quieted here, before any of them imports DeepSpeed (tasks/known_noise.py lists each message and why)."""
from tasks.known_noise import quiet_known_noise

quiet_known_noise()
