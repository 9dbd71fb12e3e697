class RegistrationResult:
    pass


def register():
    pass
