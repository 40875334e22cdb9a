"""The two conversational prompts shipped with CSM-1B: preset voices, as speakers 0 and 1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    speaker: int
    wav: str  # path inside the model folder
    transcript: str


PRESETS: dict[str, Preset] = {
    "conversational_a": Preset(
        speaker=0,
        wav="prompts/conversational_a.wav",
        transcript=(
            "like revising for an exam I'd have to try and like keep up the momentum because "
            "I'd start really early I'd be like okay I'm gonna start revising now and then like "
            "you're revising for ages and then I just like start losing steam I didn't do that "
            "for the exam we had recently to be fair that was a more of a last minute scenario "
            "but like yeah I'm trying to like yeah I noticed this yesterday that like Mondays I "
            "sort of start the day with this not like a panic but like a"
        ),
    ),
    "conversational_b": Preset(
        speaker=1,
        wav="prompts/conversational_b.wav",
        transcript=(
            "like a super Mario level. Like it's very like high detail. And like, once you get "
            "into the park, it just like, everything looks like a computer game and they have "
            "all these, like, you know, if, if there's like a, you know, like in a Mario game, "
            "they will have like a question block. And if you like, you know, punch it, a coin "
            "will come out. So like everyone, when they come into the park, they get like this "
            "little bracelet and then you can go punching question blocks around."
        ),
    ),
}
