

def test_sealed_json_reads_back_only_whole_and_unaltered(tmp_path):
    from twinlm.io import read_sealed_json, write_sealed_json

    path = tmp_path / "r.json"
    assert read_sealed_json(path) == (None, "missing")
    write_sealed_json(path, {"score": 0.5, "runs": [1, 2]})
    assert read_sealed_json(path) == ({"score": 0.5, "runs": [1, 2]}, None)
    text = path.read_text()
    path.write_text(text.replace("0.5", "0.6"))
    assert read_sealed_json(path)[1] == "its contents do not match its sha256"
    path.write_text(text[: len(text) // 2])
    assert read_sealed_json(path)[1].startswith("not whole JSON")
    path.write_text('{"score": 0.5}')
    assert read_sealed_json(path)[1] == "not a sealed result file"
