"""The stage: speakers over WHIP/WHEP and the 20 ms mixer with mix-minus."""
