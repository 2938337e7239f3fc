"""Memory that stays flat, and proof that it does: per-generation telemetry (``telemetry``), the
leak sentinel that fits trends over it (``sentinel``), and the out-of-memory report (``oom``).
See ``../shared/docs/MEMORY.md`` for the incidents each guards against."""
