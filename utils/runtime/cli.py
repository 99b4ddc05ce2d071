"""argparse pieces shared by the entry scripts."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the examples epilog printed as written."""
