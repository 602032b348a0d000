"""The OpenGL viewer (vispy): live panels that draw the latest frame of each probe."""
