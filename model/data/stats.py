"""Corpus statistics and the per-intent balance report."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from pydantic import BaseModel

from model.data.manifest import ManifestRow
from model.data.splits import ALL_SPLITS, SPLITS

__all__ = ["CorpusStats", "corpus_stats"]


class CorpusStats(BaseModel):
    """Counts over a corpus's manifests.

    ``hours_by_engine`` is audio duration in hours; ``intent_balance`` maps intent →
    split → utterance count; ``imbalance_ratio`` is the largest over the smallest
    per-intent training count (1.0 = perfectly balanced).
    """

    utterances: int
    utterances_by_split: dict[str, int]
    templates_by_split: dict[str, int]
    intents: int
    intents_by_split: dict[str, int]
    slot_types: list[str]
    slot_counts: dict[str, int]
    domains: dict[str, int]
    hours: float
    hours_by_engine: dict[str, float]
    utterances_by_engine: dict[str, int]
    voices: int
    augmented_fraction: float
    augment_kinds: dict[str, int]
    mean_duration_s: float
    intent_balance: dict[str, dict[str, int]]
    imbalance_ratio: float

    @property
    def _splits(self) -> list[str]:
        return list(self.utterances_by_split)

    def to_markdown(self) -> str:
        """Human-readable summary plus the per-intent balance table."""
        lines = [
            "# Corpus statistics",
            "",
            f"- utterances: {self.utterances} "
            + ", ".join(f"{s} {n}" for s, n in self.utterances_by_split.items()),
            "- templates: " + ", ".join(f"{s} {n}" for s, n in self.templates_by_split.items()),
            f"- intents: {self.intents}; slot types: {len(self.slot_types)}; voices: {self.voices}",
            f"- audio: {self.hours:.2f} h, mean {self.mean_duration_s:.2f} s/utterance; "
            + "; ".join(f"{e} {h:.2f} h" for e, h in self.hours_by_engine.items()),
            f"- augmented: {self.augmented_fraction:.0%} ("
            + ", ".join(f"{k} {n}" for k, n in self.augment_kinds.items())
            + ")",
            f"- training imbalance (max/min utterances per intent): {self.imbalance_ratio:.1f}",
            "",
            "## Per-intent balance",
            "",
            "| intent | " + " | ".join(self._splits) + " |",
            "|---|" + "---:|" * len(self._splits),
        ]
        for intent, by_split in self.intent_balance.items():
            cells = " | ".join(str(by_split.get(s, 0)) for s in self._splits)
            lines.append(f"| {intent} | {cells} |")
        return "\n".join(lines) + "\n"


def corpus_stats(rows: Iterable[ManifestRow]) -> CorpusStats:
    """Compute :class:`CorpusStats` over manifest rows of any splits."""
    rows = list(rows)
    by_split = Counter(r.split for r in rows)
    # The three template splits always; the held-out-voice splits when the corpus has them.
    splits = [s for s in ALL_SPLITS if s in SPLITS or by_split.get(s)]
    templates: dict[str, set[str]] = defaultdict(set)
    intents_by_split: dict[str, set[str]] = defaultdict(set)
    balance: dict[str, Counter[str]] = defaultdict(Counter)
    seconds_by_engine: Counter[str] = Counter()
    for row in rows:
        templates[row.split].add(row.template_id)
        intents_by_split[row.split].add(row.intent)
        balance[row.intent][row.split] += 1
        seconds_by_engine[row.engine] += row.duration_s
    slot_counts = Counter(slot.type for r in rows for slot in r.slots)
    train_counts = [b["train"] for b in balance.values() if b["train"]]
    total_s = sum(seconds_by_engine.values())
    return CorpusStats(
        utterances=len(rows),
        utterances_by_split={s: by_split.get(s, 0) for s in splits},
        templates_by_split={s: len(templates.get(s, ())) for s in splits},
        intents=len(balance),
        intents_by_split={s: len(intents_by_split.get(s, ())) for s in splits},
        slot_types=sorted(slot_counts),
        slot_counts=dict(slot_counts.most_common()),
        domains=dict(Counter(r.domain for r in rows).most_common()),
        hours=total_s / 3600,
        hours_by_engine={e: s / 3600 for e, s in sorted(seconds_by_engine.items())},
        utterances_by_engine=dict(sorted(Counter(r.engine for r in rows).items())),
        voices=len({(r.engine, r.voice) for r in rows}),
        augmented_fraction=(sum(1 for r in rows if r.augment) / len(rows)) if rows else 0.0,
        augment_kinds=dict(Counter(s.kind for r in rows for s in r.augment).most_common()),
        mean_duration_s=(total_s / len(rows)) if rows else 0.0,
        intent_balance={i: dict(b) for i, b in sorted(balance.items())},
        imbalance_ratio=(max(train_counts) / min(train_counts)) if train_counts else 0.0,
    )
