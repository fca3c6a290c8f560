"""A revert on a box with the prefix cache on: the smoke test must not refuse a good model.

The regression (issue 18): the standby engine had served the golden prompt, so its smoke test
took the prefix cache's path, a benign near-tie flipped the first greedy token and the free-running
comparison fell to 6%: the box refused the way back and ended ``failed``. Here the golden prompt
is one on which the cached path *does* flip a token (found with ONNX Runtime on this machine, see
``tests/random_bundles.py``), the models have the flat logits of random weights, and the flip's
margin is recorded next to the kernels' difference at that position.

Both kinds of bundle are reverted to: ``legacy`` ones carry only golden tokens (every box in the
field holds such a bundle in its other slot), the others carry reference logits and a tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.random_bundles import RandomBundles, build_random_bundles


@pytest.fixture(scope="module", params=[False, True], ids=["reference-logits", "legacy-tokens"])
def bundles(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RandomBundles:
    return build_random_bundles(tmp_path_factory.mktemp("random"), legacy=request.param)


class _Box:
    """What the update machine and the daemon give an activator: the active slot, the front."""

    def __init__(self, bundles: RandomBundles) -> None:
        from edge_agent.activation import Activator
        from edgeglm.keys import load_public_keys
        from edgeglm.profiles import load_profile

        self.active = bundles.v1
        self.engine: Any = None
        self.activator = Activator(
            load_public_keys([bundles.public]),
            load_profile(bundles.profile),
            active=lambda: self.active,
            serve=self._serve,
            serving=lambda: None,
        )

    def _serve(self, engine: Any) -> Any:
        previous, self.engine = self.engine, engine
        return previous

    def switch(self, folder: Path) -> None:
        """The machine's ``activating`` step: smoke-test in the other slot, switch, promote."""
        self.activator(folder)
        self.active = folder
        self.activator(folder)

    def ask(self, prompt: str) -> Any:
        from edge_agent.inference.generation import Prompt

        return self.engine.generate(Prompt(ids=tuple(self.engine.codec.encode(prompt)), max_tokens=16))


def test_a_revert_with_the_golden_prompt_in_the_prefix_cache_commits(
    bundles: RandomBundles, record_property: Any
) -> None:
    flip = bundles.flip
    record_property("flip_position", flip.position)
    record_property("flip_margin", flip.margin)
    record_property("path_logit_diff", flip.path_diff)
    # The flip is a near-tie that the kernels' difference covers, not a broken model.
    assert 0 <= flip.margin < flip.path_diff, flip

    box = _Box(bundles)
    box.engine = box.activator.boot(bundles.v1)
    assert box.activator.last is not None and box.activator.last.agreement == 1.0
    box.ask(flip.prompt)  # a sensor asks the golden question: the cache keeps its head
    hit = box.engine.graph.prefix.lookup(box.engine.codec.encode(flip.prompt))
    assert hit is not None and hit.tokens == len(box.engine.codec.encode(flip.prompt)) - 1

    box.switch(bundles.v11)
    assert box.engine.version == "1.1.0"
    box.ask(flip.prompt)

    box.switch(bundles.v1)  # the revert: the standby 1.0.0, whose cache holds the golden head
    assert box.engine.version == "1.0.0"
    result = box.activator.last
    assert result is not None
    assert result.agreement == 1.0, (result.describe(), flip)
    assert result.rule == ("tokens" if bundles.legacy else "logits")

    box.switch(bundles.v11)  # and forward again: 1.1.0 was the standby now
    assert box.engine.version == "1.1.0"
    assert box.activator.last is not None and box.activator.last.agreement == 1.0
