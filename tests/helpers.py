"""Small helpers shared by the tests: label names of a parameter, row by row."""
import fxsurgery as fs


def names(labels) -> set[str]:
    return {str(l) for l in labels}


def element(imap: fs.InteractionMap, param: str, index) -> set[str]:
    return names(imap.element_labels(param, tuple(index)))


def key(imap: fs.InteractionMap, param: str, index) -> tuple[set[str], set[str]]:
    meets, aligned = imap.key_of(param, tuple(index))
    return names(meets), names(aligned)
