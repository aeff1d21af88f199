"""Gated repos: the message names the model, the page to accept its licence on, and the token it needs.

The local Hub does not answer like a gated repo yet (its owner adds that); until then the client's
own error is fed to the mapping, as huggingface_hub raises it for the Hub's 401/403 `GatedRepo` answers.
"""

from __future__ import annotations

try:  # the HTTP client huggingface_hub talks through (httpx2 from 2.x on)
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError

from hf_metagpt.sources.hub_calls import HubAccessError, _call


def test_a_gated_repo_names_the_model_its_page_and_the_token(monkeypatch):
    url = f"{constants.ENDPOINT}/api/models/meta-llama/Llama-2-7b-hf/revision/main"
    response = httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"}, request=httpx2.Request("GET", url))

    def gated(*_a, **_k):
        raise GatedRepoError("Access to model meta-llama/Llama-2-7b-hf is restricted.", response=response)

    try:
        _call("meta-llama/Llama-2-7b-hf@main", gated)
    except HubAccessError as exc:
        text = str(exc)
    else:
        raise AssertionError("a gated repo was not refused")
    assert text.startswith("meta-llama/Llama-2-7b-hf@main is gated: its licence must be accepted")
    assert f"{constants.ENDPOINT.rstrip('/')}/meta-llama/Llama-2-7b-hf (logged in)" in text
    assert "--token, HF_TOKEN or `hf auth login`" in text
