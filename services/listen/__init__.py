"""`steer listen`: a local page where people hear a steered and an unsteered reply through
Blip's voice and say which one sounds more like the concept. Nothing leaves the machine."""
