"""Errors a user can act on. The CLI prints their message on one line and exits with status 2."""


class KinjectError(Exception):
    pass
