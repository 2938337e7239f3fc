"""Using what a run learned: load a generation (``loading``), play its members (``evaluate``),
export a member's actor (``export``) and draw the run's logs (``plot``). Nothing here trains."""
