"""Report and SiteRecord: JSON and JSONL round trips, summary counts, the table."""
import json
import math
from collections import Counter

import torch
from helpers import BIG, LinearStack, compiled, make_model

import torchfx_eff
from torchfx_eff.report import STATUSES, CandidateRecord, Report, SiteRecord


def _handmade() -> Report:
    return Report([
        SiteRecord(3, "linear", "rewritten", "linear", "/a/model.py:12", chosen="int8_weight_only",
                   reason="estimated fastest passing candidate (SQNR 41.0 dB)",
                   candidates=[CandidateRecord("int8_weight_only", True, None, 6.5, None, "Max(1, s0) + 2e-6"),
                               CandidateRecord("original", True, None, 10.25, 9.5, "Max(2, s0)")],
                   dims={"M": "s0", "N": "256", "K": "256"}, hints={"M": 1, "N": 256, "K": 256},
                   sqnr_db=41.0, weight_bytes=(131072, 66048)),
        SiteRecord(3, "attention", "kept", "sdpa", "/a/model.py:30", chosen="original", reason="tie",
                   candidates=[CandidateRecord("sdpa_flash", False, "needs a cuda tensor", None)],
                   sqnr_db=math.inf),
        SiteRecord(4, "attention", "missed", "softmax", "", reason="eager attention"),
        SiteRecord(5, "graph", "fallback", "-", reason="stage 'match' failed: RuntimeError: boom"),
    ])


def test_site_record_dict_round_trip():
    for rec in _handmade().sites:
        back = SiteRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
        assert back == rec
        assert type(back.weight_bytes) is type(rec.weight_bytes)
        assert all(isinstance(c, CandidateRecord) for c in back.candidates)


def test_report_json_round_trip():
    report = _handmade()
    text = report.to_json()
    assert isinstance(json.loads(text), list) and len(json.loads(text)) == len(report.sites)
    assert Report.from_json(text) == report
    assert Report.from_json(report.to_json(indent=2)) == report


def test_from_dict_ignores_unknown_keys():
    d = _handmade().sites[0].to_dict()
    d["added_in_a_later_version"] = 1
    assert SiteRecord.from_dict(d) == _handmade().sites[0]


def test_summary_counts_equal_counting_records():
    report = _handmade()
    counted = Counter((s.kind, s.status) for s in report.sites)
    summary = report.summary()
    assert {(k, st): n for k, v in summary.items() for st, n in v.items()} == dict(counted)


def _table_counts(report) -> Counter:
    """(graph, kind, status) -> number of sites, read back from str(report). Works whether the table has one row
    per site or one row per group of identical sites with a count column 'n'."""
    lines = str(report).splitlines()
    header = lines[0].split()
    col = {name: header.index(name) for name in ("graph", "kind", "status")}
    end = next(i for i, line in enumerate(lines) if line.startswith("summary:"))
    counts = Counter()
    for row in lines[2:end]:
        cells = row.split()
        n = int(cells[header.index("n")]) if "n" in header else 1
        counts[(int(cells[col["graph"]]), cells[col["kind"]], cells[col["status"]])] += n
    return counts


def test_str_lists_every_site_kind_and_status():
    report = _handmade()
    assert _table_counts(report) == Counter((s.graph_id, s.kind, s.status) for s in report.sites)
    summary_line = next(line for line in str(report).splitlines() if line.startswith("summary:"))
    for kind, by_status in report.summary().items():
        for status, n in by_status.items():
            assert f"{n} {status}" in summary_line and kind in summary_line
    assert "no sites" in str(Report())


def test_weight_bytes_totals_only_rewritten_sites():
    report = _handmade()
    report.sites.append(SiteRecord(6, "linear", "fallback", "linear", weight_bytes=(10, 5)))
    assert report.weight_bytes() == (131072, 66048)


def _compile_twice(tmp_path, log):
    """Two graphs (two models) logged to the same JSONL file; returns the report."""
    torch.manual_seed(0)
    cfg = {"log": log}
    with torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), **cfg)(torch.randn(1, 256, dtype=torch.bfloat16))
        compiled(make_model("llama", BIG, torch.bfloat16), **cfg)(torch.tensor([[5]]))
    return torchfx_eff.last_report()


def test_jsonl_log_of_a_real_compile_matches_last_report(tmp_path):
    log = tmp_path / "x.jsonl"
    report = _compile_twice(tmp_path, log)
    # records of a real compile: linear and attention sites, several statuses
    assert {s.kind for s in report.sites} >= {"linear", "attention"}
    assert len({s.graph_id for s in report.sites}) == 2
    assert all(s.status in STATUSES for s in report.sites)
    lines = log.read_text().splitlines()
    assert len(lines) == len(report.sites)
    from_log = Report.from_jsonl(log)
    assert from_log == report
    assert Report.from_json(report.to_json()) == report
    # summary and table over a real report
    counted = Counter((s.kind, s.status) for s in report.sites)
    assert sum(n for v in report.summary().values() for n in v.values()) == len(report.sites)
    assert {(k, st): n for k, v in report.summary().items() for st, n in v.items()} == dict(counted)
    assert _table_counts(report) == Counter((s.graph_id, s.kind, s.status) for s in report.sites)


def test_log_appends_and_reset_clears(tmp_path):
    log = tmp_path / "y.jsonl"
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), log=str(log))(x)
        first = torchfx_eff.last_report()
        torchfx_eff.reset()
        assert torchfx_eff.last_report().sites == []
        torch._dynamo.reset()
        compiled(LinearStack().to(torch.bfloat16), log=str(log))(x)
        second = torchfx_eff.last_report()
    assert len(first.sites) == len(second.sites) == 5  # two linear sites, the graph check's, two weight records
    assert Report.from_jsonl(log).sites == first.sites + second.sites  # appended, not overwritten
    assert first.sites[0].graph_id != second.sites[0].graph_id


def test_no_log_file_without_config_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16))(torch.randn(1, 256, dtype=torch.bfloat16))
    assert torchfx_eff.last_report().sites
    assert list(tmp_path.iterdir()) == []
