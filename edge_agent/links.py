"""The daemon's MQTT connections: the cloud broker's and, optionally, the sensors' local one.

    cloud broker <── status (retained; "offline" as the last will) · outbox items ── Links.cloud
                 ──> desired state, fetched pieces ──> update worker
    local broker ──> infer requests ──> serving stack       (no [local]: the cloud link serves)

Both connect in the background and reconnect on their own (serving never waits for the cloud).
The retained ``online`` status goes out on every (re)connect of the cloud link and after every
switch; on a clean stop an ``offline`` one replaces it (the will covers the unclean ones).
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.config import AgentConfig
from edge_agent.outbox import OutboxItem
from edgeglm.mqtt import MqttLink
from edgeglm.protocol import status_topic

__all__ = ["Links"]


class Links:
    """``status(state)`` is the encoded status message the links publish for this box."""

    def __init__(self, config: AgentConfig, status: Callable[[str], bytes]) -> None:
        device_id = config.device_id
        self._status = status
        self._topic = status_topic(device_id)
        self.cloud = MqttLink(
            config.cloud.settings(),
            client_id=f"edge-agent-{device_id}",
            will=(self._topic, status("offline"), 1, True),
        )
        self.cloud.on_connected(self.announce)
        self.local: MqttLink | None = None
        if config.local is not None:
            self.local = MqttLink(config.local.settings(), client_id=f"edge-agent-{device_id}-local")

    @property
    def serving(self) -> MqttLink:
        """The link inference requests arrive on."""
        return self.local if self.local is not None else self.cloud

    def start(self) -> Links:
        self.cloud.start()
        if self.local is not None:
            self.local.start()
        return self

    def connected(self) -> bool:
        return self.cloud.connected

    def announce(self) -> None:
        """Retained online status: on every (re)connect and after every switch."""
        self.cloud.publish(self._topic, self._status("online"), qos=1, retain=True)

    def deliver(self, item: OutboxItem) -> bool:
        return self.cloud.deliver(item.topic, item.payload, qos=item.qos, retain=item.retain)

    def say_offline(self, timeout: float = 2.0) -> None:
        self.cloud.deliver(self._topic, self._status("offline"), qos=1, retain=True, timeout=timeout)

    def close(self) -> None:
        for link in (self.local, self.cloud):
            if link is not None:
                link.close()
