# Runs at boot: start the isolator's filter on the second core and return,
# leaving the USB console free for `optogate isolator status`.
import isolator_app

isolator_app.start()
