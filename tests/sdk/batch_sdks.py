"""Drive the simulator's batch endpoints with the providers' official SDKs.

    python tests/sdk/batch_sdks.py http://127.0.0.1:8089

Each SDK creates a batch, polls it to its end, reads its results, lists
batches page by page and cancels a second batch; OpenAI and Anthropic run
with strict response validation (every field the SDK models must be
there, with its type). Prints one JSON object: the custom ids each SDK saw
answered, and the batch ids it created. Exits non-zero on any mismatch.
"""

import json
import sys
import time

BASE = sys.argv[1].rstrip("/")
DEADLINE = time.time() + 60


def wait(fetch, done):
    obj = fetch()
    while not done(obj):
        if time.time() > DEADLINE:
            raise SystemExit(f"timed out waiting: {obj}")
        time.sleep(0.1)
        obj = fetch()
    return obj


def openai_sdk(out):
    from openai import OpenAI

    c = OpenAI(base_url=f"{BASE}/v1", api_key="sk-test", _strict_response_validation=True)

    def upload(prefix, n):
        lines = [
            json.dumps(
                {
                    "custom_id": f"{prefix}{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": f"question {i}"}],
                        "max_tokens": 40,
                    },
                }
            )
            for i in range(n)
        ]
        f = c.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0, f
        return f

    f = upload("o", 4)
    b = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"switchyard_batch": "sdk-1"},
    )
    assert b.metadata == {"switchyard_batch": "sdk-1"}, b
    b = wait(lambda: c.batches.retrieve(b.id), lambda x: x.status in ("completed", "failed", "expired", "cancelled"))
    assert b.status == "completed" and b.request_counts.completed == 4, b
    text = c.files.content(b.output_file_id).text
    answered = []
    for line in text.splitlines():
        item = json.loads(line)
        assert item["response"]["status_code"] == 200, item
        body = item["response"]["body"]
        assert body["usage"]["prompt_tokens"] > 0 and body["choices"][0]["message"]["content"], item
        answered.append(item["custom_id"])
    out["openai"] = {"answered": sorted(answered), "batches": [b.id]}

    f2 = upload("x", 3)
    b2 = c.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    b2 = c.batches.cancel(b2.id)
    assert b2.status in ("cancelling", "cancelled"), b2
    b2 = wait(lambda: c.batches.retrieve(b2.id), lambda x: x.status == "cancelled")
    out["openai"]["batches"].append(b2.id)
    listed = [x.id for x in c.batches.list(limit=1)]
    assert set(out["openai"]["batches"]) <= set(listed), listed


def anthropic_sdk(out):
    import anthropic

    a = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-test", _strict_response_validation=True)

    def requests(prefix, n):
        return [
            {
                "custom_id": f"{prefix}{i}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 40,
                    "messages": [{"role": "user", "content": f"question {i}"}],
                },
            }
            for i in range(n)
        ]

    mb = a.messages.batches.create(requests=requests("a", 4))
    assert mb.processing_status == "in_progress" and mb.request_counts.processing == 4, mb
    mb = wait(lambda: a.messages.batches.retrieve(mb.id), lambda x: x.processing_status == "ended")
    assert mb.request_counts.succeeded == 4, mb
    answered = []
    for r in a.messages.batches.results(mb.id):
        assert r.result.type == "succeeded", r
        assert r.result.message.usage.input_tokens >= 0 and r.result.message.content[0].text, r
        answered.append(r.custom_id)
    out["anthropic"] = {"answered": sorted(answered), "batches": [mb.id]}

    mb2 = a.messages.batches.create(requests=requests("y", 3))
    mb2 = a.messages.batches.cancel(mb2.id)
    assert mb2.processing_status in ("canceling", "ended"), mb2
    mb2 = wait(lambda: a.messages.batches.retrieve(mb2.id), lambda x: x.processing_status == "ended")
    kinds = sorted(r.result.type for r in a.messages.batches.results(mb2.id))
    assert set(kinds) <= {"succeeded", "canceled"} and len(kinds) == 3, kinds
    out["anthropic"]["batches"].append(mb2.id)
    listed = [x.id for x in a.messages.batches.list(limit=1)]
    assert set(out["anthropic"]["batches"]) <= set(listed), listed
    deleted = a.messages.batches.delete(mb2.id)
    assert deleted.type == "message_batch_deleted", deleted


def gemini_sdk(out):
    from google import genai
    from google.genai import types

    g = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=BASE))
    # Real-time, on both API versions.
    r = g.models.generate_content(model="gemini-2.5-flash-lite", contents="hello")
    assert r.text and r.usage_metadata.prompt_token_count > 0, r
    v1 = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=BASE, api_version="v1"))
    assert v1.models.generate_content(model="gemini-2.5-flash-lite", contents="hello").text

    src = [
        {"contents": [{"role": "user", "parts": [{"text": f"question {i}"}]}], "metadata": {"key": f"g{i}"}}
        for i in range(4)
    ]
    job = g.batches.create(model="gemini-2.5-flash-lite", src=src, config={"display_name": "sdk-1"})
    assert job.name.startswith("batches/") and job.display_name == "sdk-1", job
    job = wait(lambda: g.batches.get(name=job.name), lambda x: x.done)
    assert job.state.name == "JOB_STATE_SUCCEEDED", job
    answered = []
    for item in job.dest.inlined_responses:
        assert item.response.text and item.response.usage_metadata.prompt_token_count > 0, item
        answered.append(item.metadata["key"])
    out["gemini"] = {"answered": sorted(answered), "batches": [job.name]}

    job2 = g.batches.create(model="gemini-2.5-flash-lite", src=src[:2])
    g.batches.cancel(name=job2.name)
    job2 = wait(lambda: g.batches.get(name=job2.name), lambda x: x.done)
    assert job2.state.name == "JOB_STATE_CANCELLED", job2
    out["gemini"]["batches"].append(job2.name)
    listed = [x.name for x in g.batches.list(config={"page_size": 1})]
    assert set(out["gemini"]["batches"]) <= set(listed), listed


def main():
    out = {}
    openai_sdk(out)
    anthropic_sdk(out)
    gemini_sdk(out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
