"""Submit a job to Switchyard over HTTP and wait for its answer.

    export SWITCHYARD_URL=http://127.0.0.1:9187
    export SWITCHYARD_TOKEN=sy_...   # switchyard token create --name me --scope submit
    python examples/submit_and_wait.py support "Where is my parcel?"

Prints one JSON line: the job's id, status, model, cost and answer.
Needs httpx (pip install httpx).
"""
import json, os, sys, time

import httpx

ENDED = {"succeeded", "failed", "needs_review", "dead", "cancelled"}
base = os.environ.get("SWITCHYARD_URL", "http://127.0.0.1:9187")
headers = {"Authorization": "Bearer " + os.environ["SWITCHYARD_TOKEN"]}
category = sys.argv[1] if len(sys.argv) > 1 else "support"
prompt = " ".join(sys.argv[2:]) or "Where is my parcel?"

with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
    r = http.post("/v1/jobs", json={"category": category, "prompt": prompt})
    r.raise_for_status()  # 202 queued, or 200 if this id existed already
    job_id, delay = r.json()["id"], 0.1
    while True:
        job = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in ENDED:
            break
        time.sleep(delay)
        delay = min(2.0, delay * 2)

print(json.dumps({k: job[k] for k in ("id", "status", "model", "cost_usd", "output")}))
