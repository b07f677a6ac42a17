"""`push`: the token never leaves in a file, a failed push changes nothing locally (issue 16)."""

import pickle

import pytest
from huggingface_hub import HfApi
from test_hub import TOKEN, _folder_files, hub, pruned_dir  # noqa: F401  (fixtures)

from hf_moeprune.commands.push import main as push_main
from hf_moeprune.hub import push_to_hub

REPO = "tester/safety"


def test_failed_push_writes_nothing_into_the_folder(hub, pruned_dir, monkeypatch):  # noqa: F811
    before = _folder_files(pruned_dir)
    with pytest.raises(SystemExit, match="401"):
        push_main([str(pruned_dir), REPO, "--token", "hf_WrongTokenForTests987654321"])
    assert _folder_files(pruned_dir) == before

    def broken_commit(self, *args, **kwargs):
        raise ConnectionError("connection reset while uploading")

    monkeypatch.setattr(HfApi, "create_commit", broken_commit)
    with pytest.raises(ConnectionError):
        push_to_hub(pruned_dir, REPO, token=TOKEN)
    assert _folder_files(pruned_dir) == before, "no README.md or plot left behind by a failed push"


def test_training_args_are_not_uploaded_and_binary_files_are_scanned(hub, pruned_dir):  # noqa: F811
    (pruned_dir / "training_args.bin").write_bytes(pickle.dumps({"hub_token": "whatever", "lr": 1e-4}))
    (pruned_dir / ".hidden.tmp-1-x").mkdir()
    (pruned_dir / ".hidden.tmp-1-x" / "model.safetensors").write_bytes(b"partial")
    push_to_hub(pruned_dir, REPO, token=TOKEN)
    arrived = hub.files(REPO)
    assert "training_args.bin" not in arrived and not any(name.startswith(".") for name in arrived)
    assert arrived["model.safetensors"] == (pruned_dir / "model.safetensors").read_bytes()

    # the token pickled into a binary file, and the token written into a safetensors header
    requests = len(hub.requests)
    (pruned_dir / "optimizer_notes.bin").write_bytes(b"\x80\x04" + b"\x00" * (1 << 20) + TOKEN.encode() + b".")
    with pytest.raises(SystemExit, match=r"optimizer_notes.bin' contains your Hugging Face access token") as exc:
        push_main([str(pruned_dir), REPO, "--token", TOKEN])
    assert TOKEN not in str(exc.value) and len(hub.requests) == requests
    (pruned_dir / "optimizer_notes.bin").unlink()

    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, pruned_dir / "extra.safetensors", metadata={"note": TOKEN})
    with pytest.raises(ValueError, match=r"extra.safetensors' contains your Hugging Face access token"):
        push_to_hub(pruned_dir, REPO, token=TOKEN)
    assert len(hub.requests) == requests
