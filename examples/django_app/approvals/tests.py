"""The example's own tests: Django's test client against a real worker (in this process)."""

import json

from celery.contrib.testing.worker import start_worker
from django.test import SimpleTestCase
from proj.celery import app, persist


class ApprovalFlowTests(SimpleTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.worker = start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30)
        cls.worker.__enter__()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.worker.__exit__(None, None, None)
        super().tearDownClass()

    def post(self, path: str, body: object) -> tuple[int, dict[str, str]]:
        response = self.client.post(path, json.dumps(body), content_type="application/json")
        return response.status_code, response.json()

    def test_a_person_approves_through_the_view(self) -> None:
        self.assertEqual(persist.config.store_options["prefix"], "expenses")  # CELERY_PERSIST_* were read
        status, started = self.post("/expenses/", {"id": 7, "amount": 120})
        self.assertEqual(status, 202)
        key = persist.suspension_key(app.AsyncResult(started["approval_task_id"]), timeout=60)

        status, resumed = self.post("/approvals/resume/", {"key": key, "input": {"approved": True, "by": "ann"}})
        self.assertEqual(status, 202)
        self.assertEqual(app.AsyncResult(resumed["task_id"]).get(timeout=60), "expense #7 booked by ann")

        status, again = self.post("/approvals/resume/", {"key": key, "input": {"approved": False}})
        self.assertEqual((status, again["error"]), (409, "AlreadyResumed"))

    def test_bad_keys_are_refused_by_name(self) -> None:
        status, body = self.post("/approvals/resume/", {"key": "not-a-key", "input": None})
        self.assertEqual((status, body["error"]), (400, "InvalidKey"))
        status, body = self.post("/approvals/resume/", {"input": None})
        self.assertEqual(status, 400)
