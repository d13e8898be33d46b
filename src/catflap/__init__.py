"""catflap: a self-hostable, Pipecat-Cloud-compatible WebSocket session gateway."""
