"""`loop.oracle: labelstudio` against a real Label Studio server (offline, sqlite, 127.0.0.1).

`alges run` creates the project and pushes the batch with the model's masks as predictions
and stops; an annotator's annotations are posted through the REST API; `alges label --from
labelstudio` pulls the export and imports it; the next round trains on it. The token
reaches Label Studio only through the environment: it is in no file and no log.
"""

from __future__ import annotations

import json
import logging
import urllib.request

import numpy as np
import pytest
from PIL import Image

from annotation_fixtures import STRATEGY, picks_of
from alges_dist.annotation.labelstudio import brush_results
from alges_dist.annotation.labelstudio_api import LabelStudioClient, LabelStudioError, client_from_env
from alges_dist.cli import main
from alges_dist.data.frames import load_mask
from alges_dist.data.manifest import read_manifest

PROJECT = "alges oracle test"
TOKEN_ENV = "ALGES_TEST_LABEL_STUDIO_TOKEN"
NAMES = ["background", "liver", "fat", "gallbladder", "instrument"]


def test_client_token_comes_from_the_environment_and_is_never_shown():
    with pytest.raises(ValueError, match="ALGES_UNSET_TOKEN_VARIABLE") as err:
        client_from_env("http://127.0.0.1:9", "ALGES_UNSET_TOKEN_VARIABLE", environ={})
    client = client_from_env("http://127.0.0.1:9", "T", environ={"T": "s3cr3t-t0ken"})
    assert "s3cr3t-t0ken" not in repr(client) and "s3cr3t-t0ken" not in str(err.value)
    with pytest.raises(LabelStudioError) as refused:  # nothing listens on port 9
        client.request("GET", "/api/projects")
    assert "s3cr3t-t0ken" not in str(refused.value) and "127.0.0.1:9" in str(refused.value)


@pytest.mark.ray
@pytest.mark.slow
def test_labelstudio_oracle_round_trip(ray_local, server, pending_run, monkeypatch, caplog, capsys):
    monkeypatch.setenv(TOKEN_ENV, server.token)
    caplog.set_level(logging.DEBUG)
    out = pending_run.out
    run = ["run", "--config", str(out / "config.yaml"), "--out", str(out), "--no-dashboard",
           "--set", "loop.oracle=labelstudio", "--set", f"labelstudio.url={server.url}",
           "--set", f"labelstudio.token_env={TOKEN_ENV}", "--set", f"labelstudio.project={PROJECT}",
           "--set", f"labelstudio.document_root={server.document_root}"]
    label = ["label", "--out", str(out), "--strategy", STRATEGY, "--from", "labelstudio"]
    assert main(run) == 3  # the batch is in Label Studio; the run waits for people
    assert "Label Studio project 'alges oracle test'" in capsys.readouterr().out
    picks = picks_of(pending_run)

    client = LabelStudioClient(server.url, server.token)
    projects = [p for p in client.request("GET", "/api/projects")["results"] if p["title"] == PROJECT]
    assert len(projects) == 1  # one project, made by `alges run` (the server is the session's)
    project_id = projects[0]["id"]
    tasks = client.request("GET", f"/api/projects/{project_id}/tasks")
    assert sorted(t["data"]["frame_id"] for t in tasks) == sorted(picks)
    assert all(t["total_predictions"] == 1 for t in tasks)
    with urllib.request.urlopen(urllib.request.Request(
            server.url + tasks[0]["data"]["image"], headers={"Authorization": f"Token {server.token}"})) as image:
        assert image.status == 200 and image.headers["Content-Type"] == "image/png"  # the server shows the frame
    assert main(run) == 3  # rerun while waiting: nothing is pushed twice
    assert len(client.request("GET", f"/api/projects/{project_id}/tasks")) == len(picks)

    # an annotator starts from each prediction and repaints part of it; one frame is left for later
    round_dir = pending_run.round_dir(STRATEGY, 0, 0)
    pre = {f: np.array(Image.open(round_dir / "preannotations" / f"{f}.png")) for f in picks}
    edited = {}
    for i, t in enumerate(sorted(tasks, key=lambda t: t["data"]["pick_rank"])):
        frame_id = t["data"]["frame_id"]
        edited[frame_id] = pre[frame_id].copy()
        edited[frame_id][5:20, 5 + 10 * i:30 + 10 * i] = (i + 2) % len(NAMES)
        if i < len(picks) - 1:
            client.request("POST", f"/api/tasks/{t['id']}/annotations",
                           {"result": brush_results(edited[frame_id], NAMES), "lead_time": 30.0 + i})
    before = pending_run.manifest_path(STRATEGY, 0).read_bytes()
    assert main(label) == 2  # one pick is not annotated yet: nothing imported
    assert picks[-1] in capsys.readouterr().err
    assert pending_run.manifest_path(STRATEGY, 0).read_bytes() == before
    last = next(t for t in tasks if t["data"]["frame_id"] == picks[-1])
    client.request("POST", f"/api/tasks/{last['id']}/annotations",
                   {"result": brush_results(edited[picks[-1]], NAMES), "lead_time": 32.0})
    assert main(label) == 0

    table, encoding = read_manifest(pending_run.manifest_path(STRATEGY, 0))
    uri = dict(zip(table["frame_id"].to_pylist(), table["mask_uri"].to_pylist()))
    for f in picks:  # Label Studio's export, decoded and re-encoded, is the annotator's mask pixel for pixel
        np.testing.assert_array_equal(load_mask(uri[f], encoding), edited[f])

    assert main(run) == 0  # the next round trains on the annotations
    assert pending_run.model_path(STRATEGY, 0, 1).is_file()
    correction = json.loads(pending_run.record_path(STRATEGY, 0, 0).read_text())["correction"]
    assert correction["pixels_changed"] == sum(int(np.count_nonzero(edited[f] != pre[f])) for f in picks)
    assert correction["annotation_seconds"] == pytest.approx(30 + 31 + 32)

    # the token is nowhere: not in the run folder, the export under the document root, the logs
    token = server.token.encode()
    for folder in (out, server.document_root):
        leaks = [p for p in folder.rglob("*") if p.is_file() and token in p.read_bytes()]
        assert not leaks
    assert server.token not in caplog.text
    captured = capsys.readouterr()
    assert server.token not in captured.out + captured.err
    assert TOKEN_ENV in (out / "config.yaml").read_text()  # only the variable's name is kept


def test_an_unreachable_server_is_one_clear_error_without_the_token(pending_run, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv(TOKEN_ENV, "tok-never-shown-123")
    config = yaml.safe_load((pending_run.out / "config.yaml").read_text())
    config["labelstudio"] = {"url": "http://127.0.0.1:9", "token_env": TOKEN_ENV, "project": PROJECT,
                             "document_root": str(pending_run.out)}
    (pending_run.out / "config.yaml").write_text(yaml.safe_dump(config))
    label = ["label", "--out", str(pending_run.out), "--strategy", STRATEGY, "--from", "labelstudio"]
    assert main(label) == 2  # never pushed: says so
    assert "was not pushed to Label Studio" in capsys.readouterr().err
    record = pending_run.round_dir(STRATEGY, 0, 0) / "labelstudio.json"
    record.write_text(json.dumps({"project": PROJECT, "project_id": 1, "batch": "b"}))
    assert main(label) == 2  # nothing listens on port 9: one line, no traceback, no token
    err = capsys.readouterr().err
    assert "did not answer GET /api/projects/1/export" in err and "tok-never-shown-123" not in err
