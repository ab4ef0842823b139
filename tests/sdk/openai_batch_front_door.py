"""Drive Switchyard's OpenAI Batch-compatible front door with the official
openai SDK, as a team moving its batch code over would: only base_url and
the API key (a Switchyard token) change.

    python tests/sdk/openai_batch_front_door.py http://127.0.0.1:9187/v1 sy_…

Uploads a JSONL file with three good lines and one naming an unmapped
model, creates a batch, polls it until it ends, downloads the output and
error files and parses every line (strict response validation: every field
the SDK models must be there, with its type). Prints one JSON object for
the Rust test to check; exits non-zero on any mismatch it can see itself.
"""

import json
import sys
import time

from openai import OpenAI

BASE, TOKEN = sys.argv[1], sys.argv[2]
DEADLINE = time.time() + 90

client = OpenAI(base_url=BASE, api_key=TOKEN, _strict_response_validation=True)


def request(custom_id, model, question):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "developer", "content": "Answer in one short sentence."},
                {"role": "user", "content": question},
            ],
            "max_tokens": 60,
        },
    }


lines = [
    request("q-1", "gpt-4o-mini", "What is the capital of France?"),
    request("q-2", "gpt-4o-mini", "How many legs has a spider?"),
    request("q-3", "claude-haiku-4-5", "What colour is the sky?"),
    request("q-unmapped", "gpt-9-imaginary", "Is this model known?"),
]
jsonl = "".join(json.dumps(l) + "\n" for l in lines).encode()

f = client.files.create(file=("questions.jsonl", jsonl), purpose="batch")
assert f.object == "file" and f.purpose == "batch" and f.bytes == len(jsonl), f
assert client.files.retrieve(f.id).id == f.id
assert client.files.content(f.id).content == jsonl

b = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"team": "catalogue"},
)
assert b.object == "batch" and b.input_file_id == f.id, b
assert b.metadata == {"team": "catalogue"}, b
statuses = [b.status]
while b.status not in ("completed", "failed", "expired", "cancelled"):
    if time.time() > DEADLINE:
        raise SystemExit(f"timed out waiting for the batch: {b}")
    time.sleep(0.2)
    b = client.batches.retrieve(b.id)
    if statuses[-1] != b.status:
        statuses.append(b.status)

listed = [x.id for x in client.batches.list(limit=10)]
assert b.id in listed, listed


def parse(file_id):
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(l) for l in text.splitlines() if l.strip()]


output = parse(b.output_file_id)
errors = parse(b.error_file_id)
for line in output:
    assert line["error"] is None, line
    r = line["response"]
    assert r["status_code"] == 200 and r["request_id"], line
    body = r["body"]
    assert body["object"] == "chat.completion" and body["id"], body
    assert isinstance(body["created"], int) and isinstance(body["model"], str), body
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant", body
    assert choice["message"]["content"], body
    assert choice["finish_reason"] in ("stop", "length", "content_filter"), body
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0, body
for line in errors:
    assert line["response"] is None and line["error"]["code"], line

print(
    json.dumps(
        {
            "batch_id": b.id,
            "status": b.status,
            "statuses": statuses,
            "request_counts": b.request_counts.model_dump(),
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "output": [
                {
                    "custom_id": l["custom_id"],
                    "job_id": l["response"]["request_id"],
                    "content": l["response"]["body"]["choices"][0]["message"]["content"],
                    "usage": l["response"]["body"]["usage"],
                }
                for l in output
            ],
            "errors": [
                {"custom_id": l["custom_id"], "code": l["error"]["code"], "message": l["error"]["message"]}
                for l in errors
            ],
        }
    )
)
