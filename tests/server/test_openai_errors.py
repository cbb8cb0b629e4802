"""Error answers on the OpenAI-compatible routes make the ``openai`` SDK raise its own
exceptions (and not retry a budget refusal), for every status the service answers with."""

from __future__ import annotations

import httpx2
import openai
import pytest

from chatchain.errors import (
    BudgetExceeded,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointTimeoutError,
    InvalidInputError,
    SessionBusyError,
    StoreError,
)
from chatchain.server._errors import is_openai_path, openai_error, status_of


def _raised(
    status: int, kind: str, message: str = "what happened", retries: int = 0
) -> tuple[Exception, int]:
    """What the SDK raises for the answer, and how many requests it made."""
    answered, body, headers = openai_error(status, kind, message)
    requests = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        return httpx2.Response(answered, json=body, headers={**headers, "retry-after": "0"})

    transport = httpx2.MockTransport(handler)
    with (
        openai.OpenAI(
            api_key="cc_x",
            base_url="http://service/v1",
            max_retries=retries,
            http_client=httpx2.Client(transport=transport),
        ) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return caught.value, len(requests)


@pytest.mark.parametrize(
    ("error", "raised", "code"),
    [
        (InvalidInputError("bad"), openai.BadRequestError, "InvalidInputError"),
        (
            BudgetExceeded(
                "Budget exceeded: ...",
                scope="user",
                key="ann",
                limit_usd=1.0,
                limit_tokens=None,
                spent_usd=1.0,
                spent_tokens=0,
                needed_usd=0.01,
                needed_tokens=10,
            ),
            openai.RateLimitError,
            "insufficient_quota",
        ),
        (SessionBusyError("busy"), openai.ConflictError, "SessionBusyError"),
        (StoreError("down"), openai.InternalServerError, "StoreError"),
        (EndpointTimeoutError("slow"), openai.InternalServerError, "EndpointTimeoutError"),
        (EndpointConnectionError("gone"), openai.InternalServerError, "EndpointConnectionError"),
        (ContextTooLongError("long"), openai.BadRequestError, "context_length_exceeded"),
    ],
)
def test_chatchain_errors_raise_the_sdks_exceptions(
    error: Exception, raised: type[Exception], code: str
) -> None:
    assert isinstance(error, Exception)
    exc, _ = _raised(status_of(error), type(error).__name__, str(error))  # type: ignore[arg-type]

    assert type(exc) is raised
    assert exc.code == code  # type: ignore[attr-defined]
    assert exc.message.endswith(f" - {error}")  # type: ignore[attr-defined]


def test_a_budget_refusal_is_not_retried_but_a_rate_limit_is() -> None:
    budget, budget_requests = _raised(402, "BudgetExceeded", retries=2)
    limited, limited_requests = _raised(429, "TooManyRequests", retries=2)

    assert isinstance(budget, openai.RateLimitError) and budget_requests == 1
    assert isinstance(limited, openai.RateLimitError) and limited_requests == 3
    assert limited.code == "rate_limit_exceeded"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "kind", "raised"),
    [
        (401, "Unauthorized", openai.AuthenticationError),
        (404, "model_not_found", openai.NotFoundError),
        (413, "PayloadTooLarge", openai.APIStatusError),
        (422, "InvalidInputError", openai.BadRequestError),
    ],
)
def test_the_services_own_answers_raise_the_sdks_exceptions(
    status: int, kind: str, raised: type[Exception]
) -> None:
    exc, _ = _raised(status, kind)

    assert type(exc) is raised


def test_only_the_openai_routes_answer_in_openais_shape() -> None:
    assert is_openai_path("/v1/chat/completions")
    assert is_openai_path("/v1/models") and is_openai_path("/v1/models/gpt-4o-mini")
    assert not is_openai_path("/v1/sessions/chat/messages")
    assert not is_openai_path("/v1/usage") and not is_openai_path("/healthz")
