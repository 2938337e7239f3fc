"""The run: replay, rollouts, evolution, the generation loop, telemetry and reporting."""
