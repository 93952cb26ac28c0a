"""The service: coordinator, batch scheduler, worker processes, clients, metrics."""
