"""The torchfx-eff command line: report (a JSONL log's table) and explain (a saved HF model's report)."""
import torch
from helpers import BIG, count_calls, make_model

import torchfx_eff
from torchfx_eff import cli


def test_report_prints_the_table_of_a_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    model = make_model("llama", BIG, torch.bfloat16)
    with torch.no_grad():
        torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager", log=str(log))))(
            torch.randint(0, 128, (1, 1)))
    assert cli.main(["report", str(log)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == str(torchfx_eff.report.Report.from_jsonl(log)).strip()
    assert "int8_weight_only" in printed and "rewritten" in printed


def test_explain_compiles_a_saved_model_and_prints_every_site(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHFX_EFF_INNER", "eager")
    model = make_model("llama", BIG, torch.bfloat16)
    model.save_pretrained(tmp_path)
    with torch.no_grad(), count_calls(model) as counts:
        model(torch.randint(0, 128, (1, 16)))
    assert cli.main(["explain", str(tmp_path), "--seq-len", "16"]) == 0
    report = torchfx_eff.last_report()
    assert len([s for s in report.sites if s.kind == "linear"]) == counts["linear"]
    assert len([s for s in report.sites if s.kind == "attention"]) == counts["attention"]
    assert str(report).splitlines()[0] in capsys.readouterr().out
