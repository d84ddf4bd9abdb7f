"""Algorithm registry: an explicit dict, no import-time decorators.

An algorithm is one module (or package, when it passes ~400 lines) with a server and a client
half (``base.py``); algorithm modules never import each other. What several share lives next to
them: ``weights.py`` (sending weights, screening, combining, resuming), ``training.py`` (local
steps), ``screening.py``, ``scalar_clip.py``, ``sitestore.py`` (a site's memory between rounds).
"""

from edgetune.algorithms.base import AlgorithmSpec
from edgetune.algorithms.deft import DeftClient, DeftServer
from edgetune.algorithms.dppf import DppfClient, DppfServer
from edgetune.algorithms.kavg import KavgClient, KavgServer
from edgetune.algorithms.lowrank import LowrankClient, LowrankServer
from edgetune.algorithms.spsa import SpsaClient, SpsaServer, clear_replicas

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "spsa": AlgorithmSpec("spsa", SpsaServer, SpsaClient, forget_process_state=clear_replicas),
    "kavg": AlgorithmSpec("kavg", KavgServer, KavgClient),
    "lowrank": AlgorithmSpec("lowrank", LowrankServer, LowrankClient),
    "deft": AlgorithmSpec("deft", DeftServer, DeftClient),
    "dppf": AlgorithmSpec("dppf", DppfServer, DppfClient),
}
