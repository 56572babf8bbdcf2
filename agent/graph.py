"""The tuning conversation as a LangGraph StateGraph, plus its checkpointer."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from agent import nodes_data as data
from agent import nodes_define as define
from agent import nodes_ship as ship
from agent import nodes_train as train
from agent.context import AgentContext
from agent.nodes_common import retry_wait
from agent.state import AgentState

WAITING_NODES = ("ask", "confirm", "review", "launch_wait", "offer_deploy", "deployed", "retry_wait")
_ANY_WAIT = ("import_data",)


def build_graph(checkpointer: BaseCheckpointSaver | None) -> Any:
    g: StateGraph = StateGraph(AgentState, context_schema=AgentContext)
    nodes: dict[str, tuple[Any, tuple[str, ...]]] = {
        "define": (define.define, ("ask", "persist_spec", "retry_wait")),
        "ask": (define.ask, ("define", "ask", *_ANY_WAIT)),
        "persist_spec": (define.persist_spec, ("confirm", "retry_wait")),
        "confirm": (define.confirm, ("sample", "define", "confirm", *_ANY_WAIT)),
        "sample": (data.sample, ("review", "confirm")),
        "review": (data.review, ("generate", "sample", "review", *_ANY_WAIT)),
        "generate": (data.generate, ("estimate", "review")),
        "import_data": (data.import_data, ("estimate", *WAITING_NODES)),
        "estimate": (train.estimate, ("launch_wait", "retry_wait")),
        "launch_wait": (train.launch_wait, ("start_run", "launch_wait", *_ANY_WAIT)),
        "start_run": (train.start_run, ("train", "launch_wait")),
        "train": (train.train, ("judge", "estimate")),
        "judge": (ship.judge, ("offer_deploy", "retry_wait")),
        "offer_deploy": (ship.offer_deploy, ("deploy", "offer_deploy", END, *_ANY_WAIT)),
        "deploy": (ship.deploy, ("deployed", "offer_deploy")),
        "deployed": (ship.deployed, ("undeploy", "deployed", *_ANY_WAIT)),
        "undeploy": (ship.undeploy, (END, "deployed")),
        "retry_wait": (
            retry_wait,
            ("define", "persist_spec", "sample", "generate", "estimate", "judge", *_ANY_WAIT),
        ),
    }
    for name, (fn, dests) in nodes.items():
        g.add_node(name, fn, destinations=dests)
    g.add_edge(START, "define")
    return g.compile(checkpointer=checkpointer)


def checkpoint_path(database_url: str) -> str:
    """SQLite file for graph checkpoints: a sibling of the storage SQLite file."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1] if ":///" in database_url else ":memory:"
        if path in ("", ":memory:"):
            return ":memory:"
        p = Path(path)
        return str(p.with_name(p.stem + ".checkpoints.sqlite"))
    return "tuner.checkpoints.sqlite"


def make_checkpointer(database_url: str) -> tuple[BaseCheckpointSaver, Any]:
    """(saver, connection to close). PostgresSaver when the URL is Postgres and it's installed."""
    if database_url.startswith("postgres"):
        try:
            from langgraph.checkpoint.postgres import PostgresSaver  # type: ignore[import-not-found]
            from psycopg import Connection  # type: ignore[import-not-found]
            from psycopg.rows import dict_row  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            url = database_url.replace("postgresql+psycopg://", "postgresql://")
            pconn = Connection.connect(url, autocommit=True, prepare_threshold=0, row_factory=dict_row)
            saver = PostgresSaver(pconn)
            saver.setup()
            return saver, pconn
    conn = sqlite3.connect(checkpoint_path(database_url), check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    saver = SqliteSaver(conn)
    saver.setup()
    return saver, conn
