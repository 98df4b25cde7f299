// nixfleet dashboard: the little behaviour htmx does not cover. No inline script
// anywhere (the Content-Security-Policy forbids it); this file is all there is.
"use strict";

document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("change", function (event) {
  var el = event.target;
  if (el.tagName === "SELECT" && el.form && el.form.hasAttribute("data-autosubmit")) {
    el.form.requestSubmit();
  }
});
