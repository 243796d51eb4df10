"""The exported bytes are a contract: the embedded model's hiq, gptq and lwc exports at fixed
small settings hash to the digests recorded in tests/data/export_digests.json (see
tests/export_digests.py for when and how to regenerate them)."""

from __future__ import annotations

import json

import pytest

import export_digests


@pytest.mark.parametrize("method", sorted(export_digests.SETTINGS))
def test_embedded_exports_are_byte_identical_to_the_recorded_digests(method):
    recorded = json.loads(export_digests.DIGESTS.read_text())[method]
    got = export_digests.export_digests(method)
    changed = sorted(k for k in set(recorded) | set(got) if recorded.get(k) != got.get(k))
    assert not changed, f"{method}: these exported files changed: {changed}"
