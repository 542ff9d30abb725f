"""Placeholder replaced below."""

def main(argv):
    return 0
