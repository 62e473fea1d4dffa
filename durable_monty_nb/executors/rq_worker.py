"""The RQ worker that ``durable-monty-nb worker`` runs: RQ's forking worker, stopping promptly.

Imported by the command line only (it imports ``rq``, an optional extra, at the top).
"""

from __future__ import annotations

from rq import Worker

LISTEN_SECONDS = 1.0
"""How long the worker's command listener waits for a message before it looks whether to stop."""


class DurableWorker(Worker):
    """RQ's worker, whose command listener (stop a job, shut down) wakes every ``LISTEN_SECONDS``.

    rq 3 listens in 60-second waits and counts on the reply to its ``UNSUBSCRIBE`` to wake the
    listener at shutdown. When the listener reads that reply before it is told to stop, it starts
    another 60-second wait, and redis-py 8.2's ``PubSubWorkerThread.stop`` waits for it with no
    timeout: a warm shutdown (SIGTERM, Ctrl+C) took up to a minute after the job ended.
    """

    def subscribe(self) -> None:
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=LISTEN_SECONDS, daemon=True, exception_handler=self._pubsub_exception_handler
        )
