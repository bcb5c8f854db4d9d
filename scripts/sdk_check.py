#!/usr/bin/env python3
"""End-to-end check: the official `openai` Python SDK works through the bridge.

Run by scripts/sdk-check.sh against a bridge backed by fake-circuit, with
BASE_URL=http://127.0.0.1:N/v1. Prints one PASS/FAIL line per check and exits
non-zero if any check failed.
"""
import asyncio
import os
import sys
import traceback

import openai
from openai import AsyncOpenAI, OpenAI

BASE_URL = os.environ["BASE_URL"]
SUBKEY = "team-member-subkey"  # test values; never printed
LIMITED_SUBKEY = "limited-subkey"  # one gpt-4o request a day
GREETING = "Hello from fake Circuit"
# o3 is blocked for SUBKEY by the policy scripts/sdk-check.sh writes, so it is not listed.
MODELS = ["gpt-4.1", "gpt-4o-mini", "gpt-4o", "o4-mini", "gemini-2.5-flash", "gemini-2.5-pro"]
MESSAGES = [{"role": "user", "content": "Say hello."}]

# No retries: a retried failure would hide what the bridge answered first.
client = OpenAI(base_url=BASE_URL, api_key=SUBKEY, max_retries=0, timeout=30)
checks = []


def check(fn):
    checks.append(fn)
    return fn


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def stream_text(chunks):
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)


@check
def chat_completion():
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    content = completion.choices[0].message.content
    expect(content == GREETING, f"content {content!r}")
    expect(completion.usage.total_tokens == 18, f"usage {completion.usage}")


@check
def streamed_chat_completion():
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    expect(stream_text(chunks) == GREETING, f"deltas {stream_text(chunks)!r}")
    # Circuit always sends a usage chunk; the bridge must drop it when the client didn't ask.
    with_usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    expect(not with_usage, f"unrequested usage {with_usage}")


@check
def streamed_usage_when_asked():
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    expect(stream_text(chunks) == GREETING, f"deltas {stream_text(chunks)!r}")
    last = chunks[-1]
    expect(last.usage is not None and last.usage.total_tokens == 15, f"last chunk usage {last.usage}")
    expect(last.choices == [], f"last chunk choices {last.choices}")


@check
def models_list():
    ids = [model.id for model in client.models.list()]
    expect(sorted(ids) == sorted(MODELS), f"ids {ids}")


@check
def models_retrieve():
    model = client.models.retrieve("gpt-4o")
    expect(model.id == "gpt-4o", f"model {model}")


@check
def missing_subkey_is_401():
    try:
        # Older SDKs send "Authorization: Bearer " for an empty key, newer ones none at all.
        anonymous, headers = OpenAI(base_url=BASE_URL, api_key="", max_retries=0, timeout=30), None
    except openai.OpenAIError:
        # This SDK refuses an empty key: keep the SDK's error mapping but drop the header.
        anonymous, headers = client, {"Authorization": openai.Omit()}
    try:
        anonymous.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        raise AssertionError("no error")
    except openai.AuthenticationError as e:
        body = e.response.json()  # e.body is only the "error" object
        expect(e.status_code == 401 and e.code == "subkey_required", f"status {e.status_code}, body {body}")
        expect("detail" in body, f"no top-level detail in {body}")
        sent = e.request.headers.get("authorization", "").strip()
        expect(sent in ("", "Bearer"), "a subkey was sent")  # never print it


@check
def invalid_model_is_400():
    try:
        client.chat.completions.create(model="../x", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        expect(e.code == "invalid_model", f"code {e.code!r}, body {e.body}")


@check
def circuit_400_passes_through():
    try:
        client.chat.completions.create(model="bad-request", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        # e.body is the "error" object of Circuit's own answer.
        expect(e.code == "invalid_request", f"code {e.code!r}, body {e.body}")
        expect(e.message.endswith("Azure rejected this request"), f"message {e.message!r}")


@check
def request_id_header():
    raw = client.with_raw_response.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    expect(raw.headers.get("x-request-id"), f"headers {dict(raw.headers)}")
    expect(raw.parse().choices[0].message.content == GREETING, "content")


@check
def async_streamed_chat_completion():
    async def run():
        async with AsyncOpenAI(base_url=BASE_URL, api_key=SUBKEY, max_retries=0, timeout=30) as aclient:
            stream = await aclient.chat.completions.create(
                model="gemini-2.5-flash", messages=MESSAGES, stream=True,
                stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    expect(stream_text(chunks) == GREETING, f"deltas {stream_text(chunks)!r}")
    expect(chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15, f"usage {chunks[-1].usage}")


@check
def blocked_model_is_403():
    try:
        client.chat.completions.create(model="o3", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.PermissionDeniedError as e:
        expect(e.code == "model_not_allowed", f"code {e.code!r}, body {e.body}")
    ids = [model.id for model in client.models.list()]
    expect("o3" not in ids, f"blocked model listed: {ids}")


@check
def unknown_subkey_is_403():
    stranger = OpenAI(base_url=BASE_URL, api_key="not-a-member", max_retries=0, timeout=30)
    try:
        stranger.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.PermissionDeniedError as e:
        expect(e.code == "unauthorized_subkey", f"code {e.code!r}, body {e.body}")


@check
def used_up_daily_limit_is_429_with_retry_after():
    limited = OpenAI(base_url=BASE_URL, api_key=LIMITED_SUBKEY, max_retries=0, timeout=30)
    limited.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    try:
        limited.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        raise AssertionError("no error")
    except openai.RateLimitError as e:
        expect(e.code == "quota_exceeded", f"code {e.code!r}, body {e.body}")
        retry_after = int(e.response.headers.get("retry-after", "0"))
        expect(0 < retry_after <= 86400, f"retry-after {retry_after}")


def main():
    print(f"openai SDK {openai.__version__}")
    failed = 0
    for fn in checks:
        try:
            fn()
            print(f"PASS sdk: {fn.__name__}")
        except Exception as e:  # one broken check must not hide the others
            failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=3)
            print(f"FAIL sdk: {fn.__name__}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
