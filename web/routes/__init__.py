"""The API's routes, one blueprint per resource; ``web.app`` registers them all."""
