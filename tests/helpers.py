"""Test scaffolding shared by several modules (imported as ``helpers``: tests/ is on sys.path through conftest.py).

- :func:`make_training_setup` and :func:`tiny_train_config`: synthetic scenes -> a masks dataset -> tiny random
  pipelines, and a seconds-long train-unet config on them (the train tests, the multi-process test).
- :class:`ShardWrites` (the ``shard_writes`` fixture): "a kill after the first shard" for the resume tests of
  the stages that write parquet shards (masks, import-tokencompose, grounded-sam, crops).
- :class:`HubStandIn`, :func:`online_without_token`: a local stand-in of the Hub's upload API, and no token, for both
  trainers' ``--push-to-hub`` tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

RES = 32  # training resolution of the train tests: 16x16 latents, attention maps of 16x16 and 8x8

#: The settings every tiny train-unet run of the tests shares; a module passes what it does differently.
TINY_TRAIN = dict(resolution=RES, batch_size=2, grad_accum=1, max_steps=4, lr=1e-3, lambda_token=1.0, gamma_pixel=0.1,
                  num_workers=0, checkpoint_every=0, eval_fraction=0.2, eval_max_examples=2, eval_timesteps=(500,),
                  progress=False, log_every=1)


def make_training_setup(root: Path, *, n_images: int, seed: int, size: int = 64, captions: str = "all",
                        corpus_extra: Sequence[str] = (), models: dict[str, dict] | None = None) -> dict:
    """``make_scenes`` -> ``masks --source coco-gt`` -> one tiny random pipeline per entry of ``models`` (folder
    name -> extra ``write_tiny_pipeline`` arguments; default one SD pipeline, ``base``), its tokenizer learnt
    from the scenes' captions (+ ``corpus_extra``). Returns ``{"root", "scenes", "masks", "captions", NAME: folder}``."""
    from tcompose.data.synthetic import make_scenes
    from tcompose.masks.config import MasksConfig
    from tcompose.masks.stage import run as make_masks
    from tcompose.testing.tiny_sd import write_tiny_pipeline

    scenes = make_scenes(root / "scenes", n_images=n_images, size=size, seed=seed)
    make_masks(MasksConfig(coco_dir=scenes, output=root / "masks", split="train2017", captions=captions), progress=False)
    annotations = json.loads((scenes / "annotations" / "captions_train2017.json").read_text())["annotations"]
    texts = [a["caption"] for a in annotations]
    out = {"root": root, "scenes": scenes, "masks": root / "masks", "captions": texts}
    for name, kw in (models or {"base": {}}).items():
        out[name] = write_tiny_pipeline(root / name, corpus=texts + list(corpus_extra), **({"seed": 0} | kw))
    return out


def tiny_train_config(setup: dict, output: Path, model: str = "base", **kw):
    """A :class:`TrainUnetConfig` on ``setup``'s masks and ``model`` (a pipeline of ``setup`` by name, or any model
    path): :data:`TINY_TRAIN` updated by ``kw``."""
    from tcompose.train.config import TrainUnetConfig

    return TrainUnetConfig(**({"data": setup["masks"], "output": output, "model": str(setup.get(model, model))}
                              | TINY_TRAIN | kw))


class ShardWrites:
    """Patches ``ShardedWriter.write_shard`` for a resume test; each patch returns the list of shard indices it
    lets through (the same list object, cleared when a patch is set)."""

    def __init__(self, monkeypatch):
        from tcompose.io.datasets import ShardedWriter

        self._monkeypatch, self._cls, self.real = monkeypatch, ShardedWriter, ShardedWriter.write_shard
        self.written: list[int] = []

    def kill_after_first(self) -> list[int]:
        """The first shard is written; the next write raises ``KeyboardInterrupt``, as a kill there would."""
        real, written = self.real, self.written
        written.clear()

        def write_then_die(writer, shard, *args):
            if written:
                raise KeyboardInterrupt("killed")
            written.append(shard.index)
            return real(writer, shard, *args)

        self._monkeypatch.setattr(self._cls, "write_shard", write_then_die)
        return written

    def record(self) -> list[int]:
        """Every shard is written, its index recorded."""
        real, written = self.real, self.written
        written.clear()

        def write_and_record(writer, shard, *args):
            written.append(shard.index)
            return real(writer, shard, *args)

        self._monkeypatch.setattr(self._cls, "write_shard", write_and_record)
        return written

    def restore(self) -> None:
        """The real ``write_shard`` again."""
        self._monkeypatch.setattr(self._cls, "write_shard", self.real)


def online_without_token(monkeypatch, tmp_path: Path) -> None:
    """The Hub online (HF_HUB_OFFLINE off) and no Hugging Face token anywhere (environment, token file)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)


class HubStandIn:
    """A local stand-in of the Hub endpoints an upload_folder of small files uses: create a repo, validate a card's
    YAML, preupload (every file "regular"), commit (NDJSON, base64 contents). It keeps what was committed (``files``,
    path -> bytes), the repos created (``repos``) and the commits' messages (``commits``)."""

    def __init__(self):
        import base64
        import http.server
        import threading

        files, repos, commits = {}, [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repos.append(req)
                    repo = f"{req.get('organization')}/{req['name']}" if req.get("organization") else req["name"]
                    return self._reply({"url": f"{stand_in.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":  # the model card's front matter: accepted
                    return self._reply({"warnings": [], "errors": []})
                if "/preupload/" in self.path:
                    paths = [f["path"] for f in json.loads(body)["files"]]
                    return self._reply({"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False}
                                                  for p in paths]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "header":
                            commits.append(op["value"].get("summary"))
                        if op["key"] == "file":
                            files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply({"commitUrl": f"{stand_in.url}/{repo}/commit/abc", "commitOid": "abc" * 13 + "a"})
                self.send_error(404)

        stand_in = self
        self.files, self.repos, self.commits = files, repos, commits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, monkeypatch, target: str) -> None:
        """Online, a (fake) token, and ``target`` (a trainer's ``push_run``, e.g. ``"tcompose.clip.loop.push_run"``)
        uploading to this stand-in."""
        import huggingface_hub.constants as hub_constants

        from tcompose.io import hub

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
        real, url = hub.push_run, self.url
        monkeypatch.setattr(target, lambda out, repo_id, log, **kw: real(out, repo_id, log, endpoint=url, **kw))

    def close(self):
        self.server.shutdown()
        self.server.server_close()
