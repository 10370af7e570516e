"""The actor kernel and the domain actors. anyio only: no MQTT, HTTP or SQL library here."""
