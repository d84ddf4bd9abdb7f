"""edgetune ClientApp: one handler per message type a site answers (wiring only; edgetune/project.py names it)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from edgetune.flower import client_handler, presence

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Say which site this node is."""
    with presence.handling(context.node_config):
        return client_handler.hello(msg, context)


@app.query("bye")
def bye(msg: Message, context: Context) -> Message:
    """The run is over: a site asked to leave after the run disconnects."""
    return client_handler.bye(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round's local work (the ``train`` phase of every algorithm)."""
    return client_handler.handle(msg, context, "train")


@app.train("norms")
def train_norms(msg: Message, context: Context) -> Message:
    """DEFT (deft.allocation = site-norms): train locally, upload the norm of the update per partition."""
    return client_handler.handle(msg, context, "norms")


@app.train("indices")
def train_indices(msg: Message, context: Context) -> Message:
    """DEFT: upload top-k indices of the assigned partitions (training first when there is no norms phase)."""
    return client_handler.handle(msg, context, "indices")


@app.train("values")
def train_values(msg: Message, context: Context) -> Message:
    """DEFT, last phase: upload values at the union of indices."""
    return client_handler.handle(msg, context, "values")
