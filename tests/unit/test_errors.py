import errno

from flowsteer.errors import KernelError, PermissionDenied, kernel_error


def test_kernel_error_names_operation_and_errno() -> None:
    err = kernel_error("map update", errno.E2BIG, "too many")
    assert type(err) is KernelError
    assert str(err) == "map update: too many: E2BIG (Argument list too long)"
    assert err.errno == errno.E2BIG


def test_permission_errors_are_distinguished() -> None:
    assert isinstance(kernel_error("load", errno.EPERM), PermissionDenied)
    assert isinstance(kernel_error("load", errno.EACCES), PermissionDenied)
