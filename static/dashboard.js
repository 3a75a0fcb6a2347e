// Copy buttons beside the keys shown once: the page works without this.
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  button.hidden = false;
  button.addEventListener("click", function () {
    var field = document.getElementById(button.dataset.copy);
    field.select();
    navigator.clipboard.writeText(field.value).then(function () { button.textContent = "Copied"; },
                                                    function () { document.execCommand("copy"); button.textContent = "Copied"; });
  });
});

// A page showing a secret never comes back with the Back button: the secret is wiped as
// the page is left (so a copy kept for Back holds none), and a page that comes back is
// asked for again (which shows nothing twice). The server's no-store and cookie do the
// same without scripts, for navigation within the dashboard.
if (document.querySelector(".secret")) {
  window.addEventListener("pagehide", function () {
    document.querySelectorAll(".secret").forEach(function (field) { field.value = ""; field.remove(); });
  });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { location.reload(); }
  });
}
