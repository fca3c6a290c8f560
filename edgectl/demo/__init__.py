"""``edgectl demo`` and the end-to-end tests: a whole EdgeGLM installation on one machine.

``procs`` starts the real processes (mosquitto, ``edgectl hub serve``, ``edge-agent run``),
``fleet`` drives them as an operator and a sensor do, ``models`` makes the demo's three versions
of a tiny GLM, and ``story`` tells the whole story with them.
"""
