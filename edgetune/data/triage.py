"""Built-in triage data: free-text fault reports, each routed to one of its site's categories.

A factory's maintenance desk reads fault reports written by operators ("Press P-12 on line 3:
oil is seeping from the clamp cylinder, night shift.") and routes each to a team. Every site
(plant) has its own machines and its own set of teams (five of ten categories, drawn per site),
and sees its categories with its own frequencies, so the sites are non-IID by construction.

The answer is one category word (``hydraulics``, ``electrical``, ...). Held-out reports are
never seen in training, and more than that: every category's symptom descriptions are split
into a training pool and a held-out pool that share no phrasing, so held-out accuracy measures
whether the model routes a symptom it was never shown, not whether it remembers a report.
Accuracy comes from the label tokens: each candidate category of the report's site is scored
by its log-likelihood as the answer, and the best one is the prediction (``metrics/eval.py``).

All choices come from ``crypto.schedule`` streams keyed on (seed, site index): the same
arguments give byte-identical data, and site ``i`` is the same whatever ``num_sites`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetune.crypto import schedule
from edgetune.data.demo import MACHINE_NUMBERS, MACHINE_TYPES, MAX_SITES, plant_name

CATEGORIES_PER_SITE = 5
"""Teams (categories) each site routes its reports to."""

SYSTEM_PROMPT = "You route factory fault reports. Answer with one category from the list."
"""The triage recipes' system prompt (``data.system_prompt``)."""

ANSWER_PREFIX = "Category:"
"""Every answer starts with this (part of the prompt): the label is the word that follows it."""

# Symptom descriptions per category: the first TRAIN_SYMPTOMS train, the rest are held out.
# Written in an operator's words: some name the part involved ("the level sensor", "a safety
# cover", "the cooling tower pump"), most describe only what is seen, heard or smelt.
SYMPTOMS: dict[str, tuple[str, ...]] = {
    "hydraulics": (
        "oil is seeping from the clamp cylinder",
        "the ram drifts down when the press is idle",
        "the pump whines and the pressure gauge swings",
        "a hose fitting is sweating oil onto the floor",
        "the clamp closes slowly and never reaches full force",
        "the oil tank level drops every shift",
        "the accumulator loses its charge within minutes",
        "the relief valve chatters at full load",
        "the oil in the reservoir looks milky",
        "the cylinder rod is wet with fluid after each stroke",
        "the pressure builds up far too slowly after start",
        "the ram jerks instead of moving smoothly",
        "there is a puddle of oil under the power unit",
        "the lift table sinks overnight",
        "the pressure will not hold when the valve is closed",
        "the oil temperature climbs and the ram gets sluggish",
    ),
    "electrical": (
        "the main breaker trips when the motor starts",
        "there is a burning smell from the control cabinet",
        "a fuse blows every time the heater switches on",
        "the contactor clicks on and off rapidly",
        "the motor hums but does not turn",
        "the cabinet lights flicker when the spindle runs",
        "a cable insulation is melted near the terminal block",
        "the drive shows an overcurrent fault on start",
        "sparks came out of the socket on the side panel",
        "the machine loses power for a second every few minutes",
        "the earth leakage relay keeps tripping",
        "the motor windings smell scorched",
        "the power supply voltage reads far too low",
        "one phase is missing at the motor terminals",
        "the transformer is buzzing loudly and is hot to touch",
        "the emergency lights come on because the supply drops",
    ),
    "pneumatics": (
        "air is hissing from the valve manifold",
        "the gripper cylinder does not extend fully",
        "the air pressure drops below five bar during the cycle",
        "water is collecting in the air line filter bowl",
        "the blow-off nozzle has almost no flow",
        "the solenoid valve does not shift when energised",
        "the suction cups lose the part halfway",
        "the air hose to the clamp has a split",
        "the compressed air regulator will not hold its setting",
        "the pusher moves in jerks and stalls",
        "the exhaust silencer is blocked and the cylinder returns slowly",
        "the vacuum generator does not reach its level",
        "the air dryer alarm is on and the lines are wet",
        "the cylinder cushion slams at the end of its stroke",
        "the air supply coupling leaks when connected",
        "the pick-and-place head drops parts after the air check",
    ),
    "lubrication": (
        "the grease nipple on the main bearing is dry",
        "the chain squeals and looks dry",
        "the gearbox oil level is below the mark",
        "the automatic oiler has not dispensed for days",
        "the slideways are dry and show scoring",
        "the spindle bearing runs hot because the grease is gone",
        "the lube pump alarm shows an empty reservoir",
        "the ball screw is dry and grinds when it moves",
        "the oil mist unit has run empty",
        "the conveyor rollers shriek and have no grease left",
        "the centralised greasing line is blocked",
        "the gear teeth are shiny and dry",
        "the way lube distributor is not reaching the far axis",
        "the bearing housing is dry and warm",
        "the lubricant on the guide rails has turned to sludge",
        "the drip feed oil cup is empty",
    ),
    "cooling": (
        "the coolant temperature alarm is on",
        "the chiller shows a high temperature fault",
        "the cabinet fan has stopped and the drive is hot",
        "the spindle overheats after ten minutes",
        "the cooling water flow switch has tripped",
        "the heat exchanger fins are clogged with dust",
        "the mould temperature keeps rising during the cycle",
        "the radiator of the compressor is blocked",
        "the cooling tower pump is not running",
        "the welding transformer overheats because the water stopped",
        "the oil cooler outlet is as hot as the inlet",
        "the chiller compressor short-cycles",
        "the laser source reports its water too warm",
        "the furnace cooling jacket is boiling",
        "the panel air conditioner drips and blows warm air",
        "the coolant pump runs dry and the tool glows",
    ),
    "sensors": (
        "the proximity switch does not see the part",
        "the encoder count jumps during the move",
        "the light curtain trips with nothing in it",
        "the vision camera misreads the part code",
        "the temperature probe reads minus fifty",
        "the level sensor says full when the tank is empty",
        "the load cell drifts while nothing is on it",
        "the photo eye on the conveyor flickers",
        "the pressure transducer signal is noisy",
        "the barcode scanner fails on every third label",
        "the limit switch lever is bent and never closes",
        "the thermocouple gives random spikes",
        "the distance laser reads zero all the time",
        "the inductive sensor triggers on its own bracket",
        "the flow meter shows no flow although water runs",
        "the colour sensor confuses red and brown parts",
    ),
    "controls": (
        "the PLC stops with a program fault",
        "the HMI screen is frozen",
        "the recipe does not load after the changeover",
        "the robot program halts at the same step",
        "the network to the line controller keeps dropping",
        "the axis parameters were lost after the power cut",
        "the operator panel shows a checksum error",
        "the servo drive reports a communication timeout",
        "the batch counter resets itself at random",
        "the machine ignores the start command from the panel",
        "the cycle timer shows negative values",
        "the controller reboots during the cycle",
        "the fieldbus node shows a red status light",
        "the new software version cannot reach the robot",
        "the alarm history is empty although alarms came up",
        "the line stops because the interlock logic hangs",
    ),
    "mechanical": (
        "the drive belt slips under load",
        "the guide rail is out of line by two millimetres",
        "a mounting bolt on the frame has sheared",
        "the gearbox makes a knocking noise",
        "the spindle has play in its housing",
        "the conveyor chain jumped off the sprocket",
        "the coupling between motor and pump is cracked",
        "the machine vibrates hard at full speed",
        "a gear tooth has broken off",
        "the clamp jaw is worn and lets the part move",
        "the shaft key has worked loose",
        "the roller bearing grinds and has play",
        "the table does not sit flat any more",
        "the cam follower is worn flat",
        "the hinge of the door is bent and it scrapes",
        "the pulley wobbles on its shaft",
    ),
    "safety": (
        "the guard door interlock has been bypassed",
        "the emergency stop button does not stop the machine",
        "a safety cover is missing from the drive",
        "the two-hand control works with one hand",
        "the safety mat does not react when stepped on",
        "the fence panel next to the robot is open",
        "the warning beacon does not light before motion",
        "the machine restarts by itself after the guard opens",
        "the lockout point has no padlock hasp",
        "the safety relay stays closed with the door open",
        "the pinch point under the table has no guard",
        "the reset button restarts the machine without a check",
        "the light curtain has been moved out of the opening",
        "the brake test of the robot failed",
        "the access gate key is left in the lock",
        "someone removed the chip shield to see better",
    ),
    "quality": (
        "the parts are out of tolerance on the bore",
        "the edges have heavy burrs",
        "there are scratches on every panel",
        "the welds show porosity",
        "the paint has runs and orange peel",
        "the moulded parts have short shots",
        "the thread gauge does not go on the parts",
        "the surface finish is rough after the cut",
        "the labels are printed crooked",
        "the castings have cracks near the gate",
        "the dimensions drift through the shift",
        "the holes are off position on the last batch",
        "the parts come out warped",
        "the coating thickness is below specification",
        "the glue bead is missing on some parts",
        "the assemblies fail the leak test",
    ),
}
CATEGORIES: tuple[str, ...] = tuple(SYMPTOMS)
TRAIN_SYMPTOMS = 12
"""Per category, the first 12 symptom descriptions train; the last 4 appear only in held-out reports."""

CONTEXTS = (
    "",
    "Night shift.",
    "Started after the changeover.",
    "Happened twice today.",
    "Operator stopped the line.",
    "Noticed at the start of the shift.",
    "Second time this week.",
    "Production is waiting.",
    "Came up during the weekend run.",
    "The machine is still running.",
    "Spotted by the cleaning crew.",
    "No alarm on the panel.",
)

REPORT_TEMPLATES = (
    "{machine} on line {line}: {symptom}. {context}",
    "Line {line}, {machine}: {symptom}. {context}",
    "Report from line {line}. {Symptom} on {machine}. {context}",
    "{Machine}: {symptom}. {context}",
    "Operator note, {machine} (line {line}): {symptom}. {context}",
    "Please check {machine} on line {line}, {symptom}. {context}",
)

QUESTION_TEMPLATE = "Fault report from the {site}: {report}\nCategories: {choices}.\nWhich category?"

TRAIN_REPORTS_PER_SITE = 120
HELDOUT_REPORTS_PER_SITE = 40


@dataclass(frozen=True)
class TriageSite:
    """One plant: its categories and its reports.

    ``train`` and ``heldout`` hold example dicts ``{"instruction", "response", "answer_prefix",
    "choices", "site"}``; ``choices`` is the site's categories, newline-separated (the candidates
    that accuracy ranks, ``metrics/eval.py``), and the answer follows ``Category:``.
    """

    site_id: str
    name: str
    categories: tuple[str, ...]
    train: tuple[dict[str, str], ...]
    heldout: tuple[dict[str, str], ...]


def triage_sites(
    num_sites: int,
    *,
    seed: int = 0,
    train_per_site: int = TRAIN_REPORTS_PER_SITE,
    heldout_per_site: int = HELDOUT_REPORTS_PER_SITE,
) -> list[TriageSite]:
    """Generate the triage dataset's sites.

    Parameters
    ----------
    num_sites
        Number of sites, 1 to ``MAX_SITES``.
    seed
        Run seed; the data depends on nothing else.
    train_per_site, heldout_per_site
        Reports per site (>= 1 each).

    Returns
    -------
    list[TriageSite]
        Sites ``site-0`` .. ``site-{num_sites-1}``. Report texts are unique within a site, and
        no held-out report shares a symptom description with any training report.
    """
    if not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"triage data: num_sites must be in 1..{MAX_SITES}, got {num_sites}")
    return [
        triage_site(i, num_sites, seed=seed, train_per_site=train_per_site, heldout_per_site=heldout_per_site)
        for i in range(num_sites)
    ]


def triage_site(
    site_idx: int,
    num_sites: int,
    *,
    seed: int = 0,
    train_per_site: int = TRAIN_REPORTS_PER_SITE,
    heldout_per_site: int = HELDOUT_REPORTS_PER_SITE,
) -> TriageSite:
    """``triage_sites(num_sites, ...)[site_idx]``, built alone (a site's reports depend on its index
    and the seed only).
    """
    if not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"triage data: num_sites must be in 1..{MAX_SITES}, got {num_sites}")
    if train_per_site < 1 or heldout_per_site < 1:
        raise ValueError("triage data: train_per_site and heldout_per_site must be >= 1")
    if not 0 <= site_idx < num_sites:
        raise ValueError(f"triage data: site index {site_idx} out of range for {num_sites} sites")
    root = schedule.run_key(seed)
    # The same keyed plant names as the fact-recall demo: site i is the same plant in both.
    key = schedule.derive(root, "data", "triage-site", site_idx)
    return _make_site(f"site-{site_idx}", plant_name(root, site_idx), key, train_per_site, heldout_per_site)


def triage_heldout(num_sites: int, *, seed: int = 0) -> list[dict[str, str]]:
    """All sites' held-out reports, interleaved by site (any prefix of ``num_sites`` or more
    reports covers every site).
    """
    sites = triage_sites(num_sites, seed=seed)
    depth = max(len(s.heldout) for s in sites)
    return [s.heldout[j] for j in range(depth) for s in sites if j < len(s.heldout)]


def _make_site(site_id: str, name: str, key: bytes, n_train: int, n_heldout: int) -> TriageSite:
    def stream(label: str) -> bytes:
        return schedule.derive(key, "data", label)

    picked = sorted(int(i) for i in schedule.permutation(stream("categories"), len(CATEGORIES))[:CATEGORIES_PER_SITE])
    categories = tuple(CATEGORIES[i] for i in picked)
    # Skewed, site-specific category frequencies: weights 1..5 in a keyed order.
    weights = [1 + int(i) for i in schedule.permutation(stream("weights"), CATEGORIES_PER_SITE)]
    machine_ids = schedule.permutation(stream("machines"), len(MACHINE_TYPES) * MACHINE_NUMBERS)[:8]
    machines = []
    for m in machine_ids:
        kind, number = divmod(int(m), MACHINE_NUMBERS)
        label, prefix = MACHINE_TYPES[kind]
        machines.append(f"{label} {prefix}-{number + 1}")
    choices = ", ".join(categories)

    def reports(split: str, count: int) -> tuple[dict[str, str], ...]:
        rows: list[dict[str, str]] = []
        seen: set[str] = set()
        nonce = 0
        while len(rows) < count:
            draws = schedule.integers(stream(f"{split}-draws"), 6 * 64, 1 << 30, nonce=nonce).reshape(64, 6)
            nonce += 1
            if nonce > 10_000:
                raise ValueError(f"triage data: cannot draw {count} distinct {split} reports")
            for row in draws.tolist():
                c = _weighted(row[0], weights)
                category = categories[c]
                pool = SYMPTOMS[category][:TRAIN_SYMPTOMS] if split == "train" else SYMPTOMS[category][TRAIN_SYMPTOMS:]
                symptom = pool[row[1] % len(pool)]
                machine = machines[row[2] % len(machines)]
                template = REPORT_TEMPLATES[row[3] % len(REPORT_TEMPLATES)]
                context = CONTEXTS[row[4] % len(CONTEXTS)]
                report = template.format(
                    machine=machine,
                    Machine=machine[:1].upper() + machine[1:],
                    line=1 + row[5] % 9,
                    symptom=symptom,
                    Symptom=symptom[:1].upper() + symptom[1:],
                    context=context,
                ).strip()
                if report in seen:
                    continue
                seen.add(report)
                question = QUESTION_TEMPLATE.format(site=name, report=report, choices=choices)
                rows.append(
                    {
                        "instruction": question,
                        "response": category,
                        "answer_prefix": ANSWER_PREFIX,
                        "choices": "\n".join(categories),
                        "site": site_id,
                    }
                )
                if len(rows) == count:
                    break
        return tuple(rows)

    return TriageSite(site_id, name, categories, reports("train", n_train), reports("heldout", n_heldout))


def _weighted(draw: int, weights: list[int]) -> int:
    """Index picked with probability proportional to ``weights`` from a uniform integer draw."""
    total = sum(weights)
    point = draw % total
    for i, w in enumerate(weights):
        if point < w:
            return i
        point -= w
    raise AssertionError("unreachable")
