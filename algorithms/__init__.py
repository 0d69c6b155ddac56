"""Built-in algorithms. Importing this package registers them (cheaply: heavy
libraries such as anomalib and open_clip are imported only when an algorithm is built)."""

from algorithms import (  # noqa: F401  (registers them)
    cfa,
    cflow,
    clap,
    csflow,
    cutpaste,
    deepsvdd,
    draem,
    fanogan,
    ganomaly,
    lerec,
    maple,
    mediclip,
    mkd,
    mvfa,
    padim,
    patchcore,
    ppad,
    rd4ad,
    simplenet,
    stfpm,
    utrad,
    winclip,
    zeroshot_clip,
)
