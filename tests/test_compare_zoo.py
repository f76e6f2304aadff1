"""tools/compare_zoo.py: zoo logs with repeated headers, side-by-side numbers, the PNG, clear errors."""
import contextlib
import importlib.util
import io
import os

import pytest

from conftest import REPO_ROOT, ZOO_DIR

spec = importlib.util.spec_from_file_location("compare_zoo", os.path.join(REPO_ROOT, "tools", "compare_zoo.py"))
compare_zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_zoo)

HEADER = "epoch,train_loss,eval_loss,eval_top1,eval_top5"
ZOO_CVNEXT_150 = os.path.join(ZOO_DIR, "timm", "ConvNext", "small", "summary_cvnext_150.csv")


def write(path, text):
    path.write_text(text)
    return str(path)


def run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stats = compare_zoo.main(argv)
    return stats, out.getvalue()


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_repeated_header_and_rerun_epoch(tmp_path):
    # a resumed run: header again mid-file, epoch 2 logged twice (the later row counts)
    path = write(tmp_path / "s.csv", f"{HEADER}\n0,2.0,2.1,10,40\n1,1.5,1.6,30,70\n2,1.2,1.3,35,80\n"
                                     f"{HEADER}\n2,1.1,1.2,40,85\n3,1.0,1.1,38,86\n")
    curve = compare_zoo.read_summary(path)
    assert curve["epoch"] == [0, 1, 2, 3]
    assert curve["eval_top1"] == [10, 30, 40, 38] and curve["train_loss"] == [2.0, 1.5, 1.1, 1.0]
    assert compare_zoo.final_best(curve) == {"epochs": 4, "final": 38, "best": 40, "best_epoch": 2}


@pytest.mark.skipif(not os.path.isfile(ZOO_CVNEXT_150), reason="../shared/zoo is not present")
def test_zoo_log_with_repeated_header(tmp_path):
    with open(ZOO_CVNEXT_150) as f:
        assert f.read().count("epoch,") == 2  # the file does repeat its header
    curve = compare_zoo.read_summary(ZOO_CVNEXT_150)
    assert curve["epoch"] == list(range(160))  # 150 epochs + 10 cooldown, each once
    out = tmp_path / "cmp.png"
    stats, text = run([ZOO_CVNEXT_150, "--labels", "ours", "--zoo", "cvnext_150", "--out", str(out)])
    assert is_png(out)
    assert stats["ours"]["final"] == pytest.approx(81.72, abs=0.005)
    assert stats["zoo cvnext_150"]["best"] == pytest.approx(81.72, abs=0.005)
    assert "final top-1" in text and "best top-1" in text and "81.72" in text


def test_side_by_side_with_shipped_numbers_when_zoo_is_absent(tmp_path):
    ours = write(tmp_path / "s.csv", f"{HEADER},lr\n0,2.0,2.1,10,40,0.1\n1,1.5,1.6,30.5,70,0.05\n")
    out = tmp_path / "o.png"
    stats, text = run([ours, "--zoo", "res50_100", "--zoo-dir", str(tmp_path / "no_zoo"), "--out", str(out)])
    assert is_png(out)
    assert stats[ours]["final"] == 30.5 and stats["zoo res50_100"]["final"] == 78.07
    assert stats["zoo res50_100"]["best"] == 78.18
    assert "shipped" in text
    lines = [ln for ln in text.splitlines() if ln.startswith((ours, "zoo res50_100"))]
    assert len(lines) == 2 and "30.50" in lines[0] and "78.07" in lines[1]


def test_two_runs_side_by_side(tmp_path):
    a = write(tmp_path / "a.csv", f"{HEADER}\n0,2.0,2.1,10,40\n1,1.0,1.1,90,99\n")
    b = write(tmp_path / "b.csv", f"{HEADER}\n0,2.0,2.1,12,40\n1,1.2,1.3,80,99\n")
    stats, _ = run([a, b, "--labels", "Adan", "AdamW", "--out", str(tmp_path / "ab.png")])
    assert (stats["Adan"]["final"], stats["AdamW"]["final"]) == (90, 80)
    assert is_png(tmp_path / "ab.png")


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("", "empty file"),
    ("a,b,c\n1,2,3\n", "lacks ['epoch', 'eval_top1']"),
    (f"{HEADER}\n0,1.0,1.0,ten,20\n", ":2: non-numeric"),
    (f"{HEADER}\n0,1.0,1.0,10\n", ":2: 4 fields"),
    (f"{HEADER}\n", "no epochs"),
])
def test_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        run([str(path), "--out", str(tmp_path / "x.png")])
    assert message in str(info.value.code) and "bad.csv" in str(info.value.code)
    assert not (tmp_path / "x.png").exists()


def test_unknown_zoo_run(tmp_path):
    ours = write(tmp_path / "s.csv", f"{HEADER}\n0,2.0,2.1,10,40\n")
    with pytest.raises(SystemExit, match="unknown zoo run 'res50_999'.*res50_100"):
        run([ours, "--zoo", "res50_999", "--out", str(tmp_path / "x.png")])
