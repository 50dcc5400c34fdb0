"""backend="torchfx_eff" through the torch_dynamo_backends entry point, in a fresh interpreter."""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _entry_point():
    return next((ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "torchfx_eff"),
                None)


pytestmark = pytest.mark.skipif(
    _entry_point() is None,
    reason="the torch_dynamo_backends entry point 'torchfx_eff' is not installed (run `pip install -e .`)")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch

    torch.manual_seed(0)
    # K = 24 and 40 are not multiples of 16, so no int8 candidate applies and the output must be exact
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8))
    x = torch.randn(3, 24)
    with torch.no_grad():
        ref = model(x)
        assert "torchfx_eff" not in sys.modules
        out = torch.compile(model, backend="torchfx_eff")(x)
    loaded = "torchfx_eff" in sys.modules  # imported by torch through the entry point, not by us
    import torchfx_eff

    report = torchfx_eff.last_report()
    print(json.dumps({
        "loaded": loaded,
        "equal": bool(torch.equal(out, ref)),
        "sites": [(s.kind, s.status) for s in report.sites],
    }))
""")


def test_entry_point_resolves_to_a_backend():
    fn = _entry_point().load()
    assert callable(fn)


def test_string_backend_in_a_subprocess():
    env = dict(os.environ, TORCHFX_EFF_INNER="eager")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"]
    assert result["equal"]
    assert result["sites"] == [["linear", "kept"], ["linear", "kept"]]
