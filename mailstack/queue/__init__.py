"""Queue: durable store, schedule, manager and DSNs."""
