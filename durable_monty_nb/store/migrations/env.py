"""Alembic environment for durable-monty-nb stores (run by ``durable-monty-nb upgrade``)."""

from alembic import context
from sqlalchemy import create_engine

from durable_monty_nb.store.models import metadata
from durable_monty_nb.store.schema import VERSION_TABLE

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
